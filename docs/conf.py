"""Sphinx configuration of the documentation site: the Markdown pages of docs/ and the API reference.

Build (what CI runs, any warning fails)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import lightning_moe

project = "lightning_moe"
release = lightning_moe.__version__
copyright = "lightning_moe authors, Apache-2.0"

extensions = [
    "myst_parser",  # the pages are Markdown (GitHub-flavoured tables, heading anchors)
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "sphinx.ext.napoleon",  # Google-style Args:/Returns:/Raises:
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

myst_heading_anchors = 3  # links such as cli.md#runs-that-diverge resolve (and are checked)

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autoclass_content = "both"  # the class docstring and the constructor's Args
# Lightning's hook docstrings (configure_optimizers, train_dataloader, ...) are Lightning's, not ours.
autodoc_inherit_docstrings = False

html_theme = "alabaster"  # ships with Sphinx: no theme package to install
html_theme_options = {"description": "Mixture-of-Experts training for PyTorch Lightning", "fixed_sidebar": True}
html_title = f"lightning_moe {release}"
