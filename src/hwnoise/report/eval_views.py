"""Moved to ``hwnoise.eval.views`` (beside the data it renders); the old names resolve there, with a
deprecation warning, until hwnoise 0.3. Importing this module imports nothing of the new one."""

from ..compat import module_aliases

__getattr__ = module_aliases(__name__, {
    "table": "hwnoise.eval.views:table",
    "render_png": "hwnoise.eval.views:render_png",
    "write_png": "hwnoise.eval.views:write_png",
})
