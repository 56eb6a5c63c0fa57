"""Step metrics kept on the device and read back once per logging interval.

Every training step hands its :class:`segmerge.step.StepReport` (device tensors) to
:meth:`StepMetrics.add`, which only keeps references. :meth:`StepMetrics.flush` concatenates
everything of the interval into one flat tensor and copies it to the host in one transfer (the
interval's only CPU-GPU sync), then returns interval means under the flat MLflow keys::

    loss/<objective>  grad_norm/<objective>  weight/<objective>  loss/total
    conflict/n_pairs  conflict/fraction  cosine/min  cosine/mean  weights/entropy  weights/spread
    train/update_norm  train/skipped_steps  perf/refresh_fraction
    with K <= PAIR_LIMIT objectives:  cosine/<a>__<b> (a before b)  conflict/alpha/<a>__<b>
    with more (subset objectives: 15-45): cosine/min/<objective> (its lowest cosine with any
        other row) and conflict/n/<objective> (how many rows it conflicts with) instead

so the number of keys grows linearly in K, not as K². The summaries are means over the
interval's refresh steps of per-step values: the lowest and the mean off-diagonal cosine, the
fraction of conflicting pairs (cosine < 0), the normalised entropy of the weights
(``-sum p log p / log K`` with ``p = |w| / sum |w|``: 1 = all equal) and their spread
(``(max w - min w) / mean |w|``).

Objective names can change between steps (a modality missing from a batch drops its rows), so
means are per name over the steps where it was present. Running sums of the cosine and alpha
matrices over the whole training feed the final heatmaps; a second set, emptied by
:meth:`StepMetrics.take_window`, gives the matrices of each validation interval (artifacts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["PAIR_LIMIT", "StepMetrics"]

PAIR_LIMIT = 8
"""Largest K for which every pair gets its own cosine / alpha metric keys."""


class StepMetrics:
    """Buffer of step reports between two logging points, plus training-long matrix means."""

    def __init__(self) -> None:
        self._reports: list[Any] = []
        # training-long sums for the heatmaps: (a, b) -> [sum, count]
        self._cos: dict[tuple[str, str], list[float]] = {}
        self._alpha: dict[tuple[str, str], list[float]] = {}
        self._order: list[str] = []
        self._new_window()

    def _new_window(self) -> None:
        # sums since the last take_window(): pair -> [sum, count], name -> [sum, count]
        self._win_cos: dict[tuple[str, str], list[float]] = {}
        self._win_alpha: dict[tuple[str, str], list[float]] = {}
        self._win_weight: dict[str, list[float]] = {}
        self._win_order: list[str] = []

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
                        w = self._win_weight.setdefault(obj, [0.0, 0.0])
                        w[0] += v
                        w[1] += 1.0
                    self._weight_summary(chunk, acc)
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
                if obj not in self._win_order:
                    self._win_order.append(obj)
        out = {key: s / c for key, (s, c) in sums.items() if c > 0}
        if tail:
            out["train/skipped_steps"] = values[-1]
        out["perf/refresh_fraction"] = refreshed / len(reports)
        return out

    @staticmethod
    def _weight_summary(w: list[float], acc: Any) -> None:
        k = len(w)
        total = sum(abs(v) for v in w)
        if k < 2 or not math.isfinite(total) or total <= 0:
            return
        p = [abs(v) / total for v in w]
        acc("weights/entropy", -sum(q * math.log(q) for q in p if q > 0) / math.log(k))
        acc("weights/spread", (max(w) - min(w)) / (total / k))

    def _matrix(self, kind: str, names: list[str], chunk: list[float], k: int, acc: Any) -> None:
        store = self._cos if kind == "cosine" else self._alpha
        window = self._win_cos if kind == "cosine" else self._win_alpha
        pairs = k <= PAIR_LIMIT
        off: list[float] = []
        for i in range(k):
            for j in range(k):
                if i == j or (kind == "cosine" and j < i):
                    continue
                v = chunk[i * k + j]
                key = (names[i], names[j])
                if kind == "cosine":
                    off.append(v)
                if pairs:
                    prefix = "cosine" if kind == "cosine" else "conflict/alpha"
                    acc(f"{prefix}/{names[i]}__{names[j]}", v)
                for target in (store, window):
                    s = target.setdefault(key, [0.0, 0.0])
                    s[0] += v
                    s[1] += 1.0
        if kind != "cosine" or not off:
            return
        finite = [v for v in off if math.isfinite(v)]
        if finite:
            acc("cosine/min", min(finite))
            acc("cosine/mean", sum(finite) / len(finite))
            acc("conflict/fraction", sum(v < 0 for v in finite) / len(finite))
        if not pairs:  # linear in K: each row's lowest cosine and its number of conflicts
            for i in range(k):
                row = [chunk[i * k + j] for j in range(k) if j != i]
                row = [v for v in row if math.isfinite(v)]
                if row:
                    acc(f"cosine/min/{names[i]}", min(row))
                    acc(f"conflict/n/{names[i]}", float(sum(v < 0 for v in row)))

    @staticmethod
    def _square(
        names: list[str],
        cos: Mapping[tuple[str, str], list[float]],
        alpha: Mapping[tuple[str, str], list[float]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(names)
        index = {n: i for i, n in enumerate(names)}
        c = torch.full((k, k), float("nan"), dtype=torch.float64)
        a = torch.full((k, k), float("nan"), dtype=torch.float64)
        for i in range(k):
            c[i, i] = 1.0
            a[i, i] = 0.0
        for (x, y), (s, n) in cos.items():
            c[index[x], index[y]] = c[index[y], index[x]] = s / n
        for (x, y), (s, n) in alpha.items():
            a[index[x], index[y]] = s / n
        return c, a

    def take_window(self) -> dict[str, Any]:
        """Mean matrices since the previous call (for the artifacts of one validation); resets.

        Returns:
            ``{"names": [...], "cosine": (K, K), "alpha": (K, K), "weights": (K,)}`` float64
            tensors (NaN where a pair or a row never occurred); ``names`` empty when no step
            reported a cosine matrix in the window.
        """
        names = list(self._win_order)
        cos, alpha = self._square(names, self._win_cos, self._win_alpha)
        weights = torch.tensor(
            [
                self._win_weight[n][0] / self._win_weight[n][1]
                if n in self._win_weight
                else float("nan")
                for n in names
            ],
            dtype=torch.float64,
        )
        has_matrix = bool(self._win_cos or self._win_alpha)
        self._new_window()
        if not has_matrix:
            return {
                "names": [],
                "cosine": cos[:0, :0],
                "alpha": alpha[:0, :0],
                "weights": weights[:0],
            }
        return {"names": names, "cosine": cos, "alpha": alpha, "weights": weights}

    def mean_matrices(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Objective names and the training-long mean cosine and alpha matrices (K x K)."""
        names = list(self._order)
        cos, alpha = self._square(names, self._cos, self._alpha)
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
        self._new_window()
        self._order = list(state.get("order", []))
        self._cos = {(a, b): [s, c] for a, b, s, c in state.get("cosine", [])}
        self._alpha = {(a, b): [s, c] for a, b, s, c in state.get("alpha", [])}
