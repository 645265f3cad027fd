"""Views render with matplotlib's object-oriented API: the caller's backend is never touched."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent


def test_rendering_leaves_the_backend_alone_and_writes_valid_pngs():
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(TESTS)!r})
        os.environ["HWNOISE_COMPILE"] = "0"
        import matplotlib
        matplotlib.use("svg")
        import hwnoise as hn
        from hwnoise.eval import views as eval_views
        from hwnoise.scan import views as scan_views
        from _scan_models import ByteTokenizer, tiny_llama

        report = hn.scan(tiny_llama(layers=2), ByteTokenizer(), texts=["a b c d", "one two three"], format="mxfp4")
        images = scan_views.render_plots(report)
        assert images and all(png[:8] == b"\\x89PNG\\r\\n\\x1a\\n" for png in images.values()), list(images)
        from test_eval import char_tokenizer, problems, tiny_model
        ev = hn.evaluate(tiny_model(), char_tokenizer(), problems(2), ["relative:0.1@ops", "weights:nvfp4"],
                         batch_size=2, max_new_tokens=2)
        png = eval_views.render_png(ev.to_json())
        assert png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        print(matplotlib.get_backend())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "svg"


def test_view_modules_never_switch_the_backend():
    src = TESTS.parent / "src" / "hwnoise"
    for path in (src / "scan" / "views.py", src / "eval" / "views.py"):
        text = path.read_text(encoding="utf-8")
        assert "matplotlib.use(" not in text and "pyplot" not in text.replace("no pyplot", ""), path
