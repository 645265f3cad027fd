"""The bundled model's stand-in for the GPU machine.

The bundled SmolLM2-135M GGUF (94 MiB) does not fit in what a device run carries (64 MiB, wheels
included), so the GPU check uses the same architecture and tokenizer with seeded random weights:
the same shapes, hence the same kernels and timings; no meaningful accuracy.

  python benchmarks/gpu_model.py export DIR   # here: config, generation config and tokenizer (~3.5 MB)
  python benchmarks/gpu_model.py build DIR OUT  # there: random weights (seed 0), saved as safetensors
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "special_tokens_map.json")


def export(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hwnoise.models import resolve

    source = Path(resolve("default"))
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    print(f"exported {', '.join(p.name for p in sorted(out.iterdir()))} from {source} to {out}")


def build(skeleton: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        print(f"{out} exists")
        return
    config = AutoConfig.from_pretrained(skeleton)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(skeleton).save_pretrained(out)
    for name in ("generation_config.json", "chat_template.jinja"):
        if (skeleton / name).is_file() and not (out / name).exists():
            shutil.copy2(skeleton / name, out / name)
    print(f"built {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M random parameters "
          f"({config.num_hidden_layers} layers)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "export":
        export(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "build":
        build(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
