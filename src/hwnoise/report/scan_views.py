"""Moved to ``hwnoise.scan.views`` (beside the data it renders); the old names resolve there, with a
deprecation warning, until hwnoise 0.3. Importing this module imports nothing of the new one."""

from ..compat import module_aliases

__getattr__ = module_aliases(__name__, {
    "PLOTS": "hwnoise.scan.views:PLOTS",
    "short_name": "hwnoise.scan.views:short_name",
    "table": "hwnoise.scan.views:table",
    "render_plots": "hwnoise.scan.views:render_plots",
    "plan_table": "hwnoise.scan.views:plan_table",
    "write_plots": "hwnoise.scan.views:write_plots",
    "html_page": "hwnoise.scan.views:html_page",
})
