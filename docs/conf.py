"""Sphinx configuration for the annbatch documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``. Notebooks are not executed by default
(``nb_execution_mode = "off"``), so the build is quick; pass ``-D nb_execution_mode=auto`` to run
them. The build needs no network: links into other projects' docs (intersphinx) are made only on Read
the Docs or with ``ANNBATCH_DOCS_ONLINE=1``.
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version as _version
from importlib.util import find_spec
from pathlib import Path

HERE = Path(__file__).parent
# Build against the source tree even when annbatch is not installed in editable mode.
sys.path.insert(0, str(HERE.parent / "src"))

# sphinx-autodoc-typehints still calls an API that Sphinx 9 deprecates; nothing for us to act on.
warnings.filterwarnings("ignore", message=r".*set_application.* is deprecated")

# -- Project information ---------------------------------------------------------------------------

project = "annbatch"
author = "annbatch developers"
copyright = f"{datetime.now():%Y}, {author}"
try:
    release = _version("annbatch")
except PackageNotFoundError:  # building from a checkout that is not installed
    release = "unknown"
version = release

# -- General configuration -------------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
]
if find_spec("sphinx_autodoc_typehints") is not None:
    # must come after napoleon so that it sees the converted docstrings
    extensions.append("sphinx_autodoc_typehints")
else:
    autodoc_typehints = "description"

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
nitpicky = False

# -- MyST / notebooks ------------------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "html_image", "html_admonition"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_execution_timeout = 300
nb_merge_streams = True

# -- autodoc / autosummary / napoleon --------------------------------------------------------------

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"show-inheritance": True}
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_custom_sections = [("Params", "Parameters")]
typehints_defaults = "braces"
always_document_param_types = True
typehints_document_rtype = True
# Names that only exist for type checkers, or private aliases, are not cross-referenceable.
suppress_warnings = ["sphinx_autodoc_typehints.forward_reference", "sphinx_autodoc_typehints.guarded_import"]

# -- intersphinx -----------------------------------------------------------------------------------

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "zarr": ("https://zarr.readthedocs.io/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
}
intersphinx_timeout = 10
# Links into other projects' docs need their inventories from the network. Fetching is opt-in, so
# that a build without network (CI, a laptop on a train) neither fails under -W nor sends traffic:
# Read the Docs sets READTHEDOCS; elsewhere set ANNBATCH_DOCS_ONLINE=1.
if not (os.environ.get("READTHEDOCS") or os.environ.get("ANNBATCH_DOCS_ONLINE")):
    intersphinx_mapping = {}

# -- HTML output -----------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = project
html_static_path = ["_static"]
html_show_sphinx = False
html_theme_options = {
    "use_download_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}


# -- only our own members --------------------------------------------------------------------------


def _defined_outside_annbatch(obj: object) -> bool:
    target = getattr(obj, "fget", obj)  # properties: their getter
    module = getattr(target, "__module__", None)
    return isinstance(module, str) and not module.startswith("annbatch")


def _skip_foreign_member(app, what, name, obj, skip, options):
    # Members inherited from torch / Lightning base classes are theirs to document (and their
    # docstrings reference labels that only exist in their docs).
    return True if _defined_outside_annbatch(obj) else None


def setup(app):
    app.connect("autodoc-skip-member", _skip_foreign_member)
