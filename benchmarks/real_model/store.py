"""The output directory of `real_model.reproduce`: one JSON file per finished piece (base evaluation, task model,
selection, sweep point, run), where each lives, reading them back, and the record of each sitting."""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any

from benchmarks.common.run_info import git_commit, write_json


class Store:
    """Paths of every result file under `root`, and reading them back."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def knowledge(self) -> str:
        return self.path("base", "knowledge.json")

    def base(self, fam: str) -> str:
        return self.path("base", f"{fam}.json")

    def task_model(self, fam: str) -> str:
        return self.path("task_models", f"{fam}.json")

    def selection(self, fam: str, name: str) -> str:
        return self.path("selections", fam, f"{name}.json")

    def sweep(self, fam: str, lr_family: str, lr: float) -> str:
        return self.path("sweep", fam, f"{lr_family}_lr{lr:g}.json")

    def run(self, fam: str, arm: str, seed: int) -> str:
        return self.path("runs", fam, arm, f"seed{seed}.json")

    def ablation_run(self, part: str, fam: str, variant: str, seed: int) -> str:
        return self.path("ablations", part, fam, variant, f"seed{seed}.json")

    def metric_task_model(self, fam: str) -> str:
        """The metric part's task-model job: the head-choice task model retrained, scored by every metric."""
        return self.path("ablations", "metric", fam, "task_model.json")

    def ablation_runs(self, part: str, fam: str, variant: str) -> list[dict]:
        files = glob.glob(self.path("ablations", part, fam, variant, "seed*.json"))
        return sorted((self.load(f) for f in files), key=lambda r: r["seed"])

    @staticmethod
    def load(path: str) -> Any:
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def chosen_lr(self, fam: str, lr_family: str, grid: list[float]) -> tuple[float, dict] | None:
        """(lr, sweep point) with the best validation exact match (ties: lower validation loss); None while a point
        of the grid is missing."""
        points = [self.load(self.sweep(fam, lr_family, lr)) for lr in grid]
        if any(p is None for p in points):
            return None
        best = max(points, key=lambda p: (p["val"]["exact_match"], -p["val"]["loss"]))
        return best["lr"], best

    def runs(self, fam: str, arm: str) -> list[dict]:
        files = glob.glob(self.path("runs", fam, arm, "seed*.json"))
        return sorted((self.load(f) for f in files), key=lambda r: r["seed"])

    def job_times(self) -> dict[str, list[float]]:
        """Measured wall seconds of every finished job, by job kind."""
        out: dict[str, list[float]] = {}
        for f in glob.glob(self.path("**", "*.json"), recursive=True):
            data = self.load(f)
            job = data.get("job") if isinstance(data, dict) else None
            if isinstance(job, dict) and "kind" in job:
                out.setdefault(job["kind"], []).append(float(job["wall_s"]))
        return out

    def check_config(
        self, sizes: dict, name: str = "config.json", growable: tuple[str, ...] = (), write: bool = True
    ) -> None:
        """Record the sizes on the first run; refuse to mix results of other sizes into this directory. A key in
        `growable` (a list of seeds, say) may be new to the recorded sizes or may have grown (the recorded list a
        subset of the new one, the recorded dict's entries all in the new one): the record then takes the new value.
        `write=False` only checks."""
        path = self.path(name)
        saved = self.load(path)
        now = json.loads(json.dumps(sizes))
        if saved is None:
            if write:
                write_json(path, now)
            return

        def grows(old: Any, new: Any) -> bool:
            if isinstance(old, dict) and isinstance(new, dict):  # entries may be added, none changed
                return all(k in new and new[k] == v for k, v in old.items())
            return old is None or (isinstance(old, list) and isinstance(new, list) and set(old) <= set(new))

        changed = sorted(
            k
            for k in set(saved) | set(now)
            if saved.get(k) != now.get(k) and not (k in growable and grows(saved.get(k), now.get(k)))
        )
        if changed:
            raise SystemExit(
                f"{self.root} holds results made with other sizes ({', '.join(changed)}); use another "
                "--output-dir, or the options of that run."
            )
        if saved != now and write:
            write_json(path, now)

    def start_sitting(self, command: str) -> int:
        sittings = self.load(self.path("sittings.json")) or []
        sittings.append(
            {"command": command, "commit": git_commit([self.root], short=False), "start": time.time(), "end": None}
        )
        write_json(self.path("sittings.json"), sittings)
        return len(sittings) - 1

    def end_sitting(self, index: int) -> None:
        sittings = self.load(self.path("sittings.json")) or []
        if index < len(sittings):
            sittings[index]["end"] = time.time()
            write_json(self.path("sittings.json"), sittings)
