"""Does a compiled training step compile once? (issue 24 §4)

For each method, a short pre-training run on the built-in digits through the real loop
(``selfsup.train.pretrain``) with ``train.compile=true``, every per-step schedule moving: the lr
warm-up and cosine, MoCo's cosine momentum and its Shuffle BN permutation, BYOL's and DINO's EMA,
DINO's teacher-temperature warm-up and the end of its last-layer freeze, SwAV's prototype freeze
and queue start. Dynamo's ``recompiles`` and ``graph_breaks`` logs (what
``TORCH_LOGS=recompiles,graph_breaks`` prints) are counted per training step; the goal is none
after the first step, except the two planned ones of SwAV's queue (it starts filling, then joins
Sinkhorn's input: the graph really changes), which are counted apart. Then the same run eager, and the train seconds of the last epoch, compiled
against eager (the run's ``metrics.jsonl``; both runs in this process, one after the other).

    python benchmarks/compile_check.py                          # simclr, moco, byol, swav, dino
    python benchmarks/compile_check.py --methods moco --epochs 2 --json /tmp/compile.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch._dynamo.utils import counters  # noqa: E402

from selfsup import api  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402

#: Per method: settings that make each of its per-step schedules change inside the short run.
MOVING = {
    "simclr": {},
    "moco": {"moco": {"queue_size": 4096, "momentum_cosine": True}},
    "byol": {},
    "swav": {"swav": {"prototypes": 300, "freeze_prototypes_epochs": 1, "queue_length": 512, "queue_start_epoch": 1}},
    "dino": {"dino": {"out_dim": 1024, "warmup_teacher_temp_epochs": 2, "freeze_last_layer_epochs": 1},
             "multicrop": {"local_crops": 2, "local_size": 16}},
}


class Counter(logging.Handler):
    """Counts Dynamo's recompile and graph-break records, each under the training step it came in;
    and, as a cross-check that needs no log, Dynamo's own counters of compiled graphs and graph
    breaks at the end of the first step (``after_first``)."""

    def __init__(self):
        super().__init__()
        self.step, self.events, self.after_first = 0, [], None

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        kind = ("recompile" if "Recompiling" in text else
                "graph_break" if "Graph break" in text or "graph break" in text.lower() else None)
        if kind:
            planned = kind == "recompile" and ("queue_filling" in text or "queue_full" in text)
            self.events.append((self.step, "planned recompile (SwAV's queue)" if planned else kind,
                                text.splitlines()[0][:200]))


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far, from Dynamo's counters."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def run(method: str, compiled: bool, args, counter: Counter, work: Path) -> dict:
    out = work / f"{method}-{'compiled' if compiled else 'eager'}"
    config = {"method": method, "out": str(out), "data": {"source": "digits"},
              "model": {"width": args.width},
              "train": {"batch_size": args.batch, "epochs": args.epochs, "compile": compiled, "progress": False,
                        "checkpoint_every": 1000, "precision": args.precision, "device": "cpu"},
              "optim": {"warmup_epochs": 1},
              "eval": {"knn_every": 0, "online_linear": False}}
    for section, values in MOVING.get(method, {}).items():
        config.setdefault(section, {}).update(values)
    cls = METHODS[method]
    original = cls.on_step_end

    def counted(self, info):  # the step index the log records fall under: 0 is the first step
        original(self, info)
        counter.step = info.step + 1
        if counter.after_first is None:
            counter.after_first = dynamo_counts()
    cls.on_step_end = counted
    counter.step, counter.events, counter.after_first = 0, [], None
    torch._dynamo.reset()
    counters.clear()
    t0 = time.perf_counter()
    try:
        api.pretrain(config)
    finally:
        cls.on_step_end = original
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    events = list(counter.events)
    graphs, breaks = (end - first for end, first in zip(dynamo_counts(), counter.after_first or (0, 0)))
    return {"graphs_compiled_after_first_step": graphs, "graph_breaks_counted_after_first_step": breaks,"wall_s": wall, "epoch_seconds": [r["seconds"] for r in rows], "loss": rows[-1]["loss"],
            "steps": rows[-1]["step"],
            "recompiles_after_first_step": sum(1 for s, k, _ in events if s > 0 and k == "recompile"),
            "graph_breaks_after_first_step": sum(1 for s, k, _ in events if s > 0 and k == "graph_break"),
            "planned_recompiles": sum(1 for s, k, _ in events if s > 0 and k.startswith("planned")),
            "first_step_events": sum(1 for s, _, _ in events if s == 0),
            "events_after_first_step": [f"step {s}: {k}: {t}" for s, k, t in events if s > 0][:10]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="simclr,moco,byol,swav,dino")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    counter = Counter()
    logging.getLogger("torch._dynamo").addHandler(counter)  # set_logs stops its records short of "torch"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# compile check: torch {torch.__version__}, {cpu}, {torch.get_num_threads()} threads; digits, "
          f"batch {args.batch}, width {args.width}, {args.epochs} epochs, {args.precision}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            compiled = run(method, True, args, counter, Path(tmp))
            eager = run(method, False, args, counter, Path(tmp))
            ratio = compiled["epoch_seconds"][-1] / eager["epoch_seconds"][-1]
            results[method] = {"compiled": compiled, "eager": eager, "last_epoch_compiled_over_eager": ratio}
            print(f"{method:<7} steps {compiled['steps']}: recompiles after step 1: "
                  f"{compiled['recompiles_after_first_step']}, graph breaks after step 1: "
                  f"{compiled['graph_breaks_after_first_step']}, planned {compiled['planned_recompiles']} "
                  f"(step 1: {compiled['first_step_events']} events; Dynamo's counters after step 1: "
                  f"{compiled['graphs_compiled_after_first_step']} graphs, "
                  f"{compiled['graph_breaks_counted_after_first_step']} breaks); "
                  f"last epoch {compiled['epoch_seconds'][-1]:.2f} s compiled vs {eager['epoch_seconds'][-1]:.2f} s "
                  f"eager ({ratio:.2f}x); first epoch compiled {compiled['epoch_seconds'][0]:.1f} s", flush=True)
            for line in compiled["events_after_first_step"]:
                print("   ", line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return int(any(r["compiled"]["recompiles_after_first_step"] or r["compiled"]["graph_breaks_after_first_step"]
                   for r in results.values()))


if __name__ == "__main__":
    sys.exit(main())
