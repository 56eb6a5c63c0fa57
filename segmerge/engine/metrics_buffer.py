"""Step metrics kept on the device and read back once per logging interval.

Every training step hands its :class:`segmerge.step.StepReport` (device tensors) to
:meth:`StepMetrics.add`, which only keeps references. :meth:`StepMetrics.flush` concatenates
everything of the interval into one flat tensor and copies it to the host in one transfer (the
interval's only CPU-GPU sync), then returns interval means under the flat MLflow keys::

    loss/<objective>  grad_norm/<objective>  weight/<objective>  loss/total
    cosine/<a>__<b> (a before b)  conflict/alpha/<a>__<b> (a != b)  conflict/n_pairs
    train/update_norm  train/skipped_steps  perf/refresh_fraction

Objective names can change between steps (a modality missing from a batch drops its rows), so
means are per name over the steps where it was present. Running sums of the cosine and alpha
matrices over the whole training feed the heatmaps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["StepMetrics"]


class StepMetrics:
    """Buffer of step reports between two logging points, plus training-long matrix means."""

    def __init__(self) -> None:
        self._reports: list[Any] = []
        # training-long sums for the heatmaps: (a, b) -> [sum, count]
        self._cos: dict[tuple[str, str], list[float]] = {}
        self._alpha: dict[tuple[str, str], list[float]] = {}
        self._order: list[str] = []

    def add(self, report: Any) -> None:
        """Keep a step report (no host sync)."""
        self._reports.append(report)

    def __len__(self) -> int:
        return len(self._reports)

    def flush(self) -> dict[str, float]:
        """Interval means of every metric (one device-to-host copy); empties the buffer."""
        reports, self._reports = self._reports, []
        if not reports:
            return {}
        parts: list[torch.Tensor] = []
        layout: list[tuple[Any, list[tuple[str, int]]]] = []
        for r in reports:
            fields: list[tuple[str, int]] = []
            for name in (
                "losses",
                "weights",
                "norms",
                "cosine",
                "alpha",
                "n_conflicts",
                "grad_norm",
            ):
                t = getattr(r, name, None)
                if t is None:
                    continue
                flat = t.detach().reshape(-1).float()
                parts.append(flat)
                fields.append((name, flat.numel()))
            layout.append((r, fields))
        last = reports[-1]
        tail = [getattr(last, "skipped_total", None)]
        tail = [t.detach().reshape(-1).float() for t in tail if t is not None]
        values = torch.cat([p.to(parts[0].device) for p in parts + tail]).cpu().tolist()
        sums: dict[str, list[float]] = {}

        def acc(key: str, value: float) -> None:
            s = sums.setdefault(key, [0.0, 0.0])
            s[0] += value
            s[1] += 1.0

        pos = 0
        refreshed = 0
        for r, fields in layout:
            names = list(r.names)
            k = len(names)
            refreshed += int(bool(getattr(r, "refreshed", True)))
            for name, n in fields:
                chunk = values[pos : pos + n]
                pos += n
                if name == "losses":
                    for obj, v in zip(names, chunk):
                        acc(f"loss/{obj}", v)
                    acc("loss/total", sum(chunk))
                elif name == "weights":
                    for obj, v in zip(names, chunk):
                        acc(f"weight/{obj}", v)
                elif name == "norms":
                    for obj, v in zip(names, chunk):
                        acc(f"grad_norm/{obj}", v)
                elif name in ("cosine", "alpha"):
                    self._matrix(name, names, chunk, k, acc)
                elif name == "n_conflicts":
                    acc("conflict/n_pairs", chunk[0])
                elif name == "grad_norm":
                    acc("train/update_norm", chunk[0])
            for obj in names:
                if obj not in self._order:
                    self._order.append(obj)
        out = {key: s / c for key, (s, c) in sums.items() if c > 0}
        if tail:
            out["train/skipped_steps"] = values[-1]
        out["perf/refresh_fraction"] = refreshed / len(reports)
        return out

    def _matrix(self, kind: str, names: list[str], chunk: list[float], k: int, acc: Any) -> None:
        store = self._cos if kind == "cosine" else self._alpha
        for i in range(k):
            for j in range(k):
                if i == j or (kind == "cosine" and j < i):
                    continue
                v = chunk[i * k + j]
                key = (names[i], names[j])
                if kind == "cosine":
                    acc(f"cosine/{names[i]}__{names[j]}", v)
                else:
                    acc(f"conflict/alpha/{names[i]}__{names[j]}", v)
                s = store.setdefault(key, [0.0, 0.0])
                s[0] += v
                s[1] += 1.0

    def mean_matrices(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Objective names and the training-long mean cosine and alpha matrices (K x K)."""
        names = list(self._order)
        k = len(names)
        cos = torch.full((k, k), float("nan"), dtype=torch.float64)
        alpha = torch.full((k, k), float("nan"), dtype=torch.float64)
        for i in range(k):
            cos[i, i] = 1.0
            alpha[i, i] = 0.0
        for (a, b), (s, c) in self._cos.items():
            i, j = names.index(a), names.index(b)
            cos[i, j] = cos[j, i] = s / c
        for (a, b), (s, c) in self._alpha.items():
            alpha[names.index(a), names.index(b)] = s / c
        return names, cos, alpha

    def state_dict(self) -> dict[str, Any]:
        """Training-long sums (plain containers, safe to load with ``weights_only``)."""
        return {
            "order": list(self._order),
            "cosine": [[a, b, s, c] for (a, b), (s, c) in self._cos.items()],
            "alpha": [[a, b, s, c] for (a, b), (s, c) in self._alpha.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict resets)."""
        self._reports = []
        self._order = list(state.get("order", []))
        self._cos = {(a, b): [s, c] for a, b, s, c in state.get("cosine", [])}
        self._alpha = {(a, b): [s, c] for a, b, s, c in state.get("alpha", [])}
