"""`aldm bench --torch`: PyTorch eager timings of the components, run in a process of its own by
aldm.runtime.bench (``python -m aldm.export.bench_torch torch CONFIG_JSON OUT_JSON``), so that
torch's memory is not counted as the engine path's and the runtime never imports the models."""

from __future__ import annotations

import os
import sys

from aldm.runtime.bench_child import component_feeds, main, peak_rss_mb, time_calls
from aldm.runtime.manifest import ModelDir


def torch_eager(cfg: dict) -> dict:
    """cfg: model_dir, components, threads, warmup, repeats, device, fp16."""
    import torch

    from aldm.export.check import TorchRunner
    from aldm.models import ALDM, LDMConfig

    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    model_dir = ModelDir(cfg["model_dir"], verify=False)
    config = model_dir.manifest.config
    torch.manual_seed(0)
    model = ALDM(LDMConfig.from_dict(config) if config else LDMConfig()).eval()
    device, fp16 = cfg.get("device", "cpu"), bool(cfg.get("fp16", False))
    res = {"device": device, "fp16_autocast": fp16, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "pid": os.getpid(), "components": {}}
    for c in cfg["components"]:
        say(f"torch eager ({device}{', fp16' if fp16 else ''}): {c}")
        feeds = component_feeds(model_dir, c)
        runner = TorchRunner(model, c, device, autocast=fp16)
        runner.activate()
        res["components"][c] = time_calls(lambda: runner.infer(feeds), int(cfg["warmup"]), int(cfg["repeats"]))
    res["peak_rss_mb"] = peak_rss_mb()
    return res


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], {"torch": torch_eager}))
