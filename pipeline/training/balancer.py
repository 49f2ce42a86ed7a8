"""Weighting the DSMD loss terms into one objective: dynamic self-adaptive, fixed or uniform."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.common import runtime

BALANCER_MODES = ("calibrated", "dynamic", "authors", "fixed", "uniform")  # pipeline.config.BalancerMode (a test keeps them equal)


class LossBalancer:
    """total = sum_i w_i L_i over the named terms, with weights that carry no gradient.

    Modes:
    - `calibrated`: each term is measured against its own early size, DWA rates come
      from smoothed losses, and the task term keeps a guaranteed share:

          ref_i   = mean of L_i over the first `calibration_steps` steps (frozen afterwards)
          fast_i, slow_i = EMAs of L_i with time constants `window` and 4 * `window` steps
          r_i     = fast_i / slow_i                     (< 1 while the term is falling)
          w_task  = s / ref_task      (s = task_share, or moving linearly to task_share_end over the run)
          w_i     = (1 - s) * softmax_d(r / T)_i * prior_i / ref_i      (distillation terms d)

      so the objective starts near 1 with the task term at `task_share` of it, and no weight grows
      as its term nears 0 (ref_i is fixed once calibrated). `weights` (optional) are priors prior_i
      on the distillation terms (default 1; they are normalised to mean 1).
    - `authors`: the authors' code, which reduces to w_i = (k / n) max_j L_j / L_i with k = 10.
    - `uniform`: w_i = 1.
    - `fixed`: w_i = fixed_weights[name] (every name needs one; weights of other names are
      ignored, so a term can be switched off without editing them).
    - `dynamic` (the default): magnitude equalisation times Dynamic Weight Average (DWA) rates:

          m_i = max_j L_j(t) / (L_i(t) + eps)                    (detached)
          r_i = L_i(t-1) / L_i(t-2)                              (raw losses of the two previous steps)
          w_i = n * softmax(r / T)_i * m_i

      so w_i L_i = n softmax(r/T)_i max_j L_j: with equal rates every term contributes on the scale of
      the largest one, and a term that falls slowly (r_i near or above 1) gets more weight than one
      that falls fast. During the first two steps (no two-step history) r = 1 and w = m; a rate
      whose denominator is <= eps (the term was 0) is taken as 1. The authors' code computes r from
      a_i = L_i m_i = max L, which is the same for every term, so their rule reduces to
      w_i = (k/n) max(L) / L_i (k = 10): magnitude equalisation only.
      `max_weight` > 0 caps each w_i: m_i grows without bound as a term approaches 0 (a hinge
      loss whose margins are almost all met), which magnifies that term's gradient without bound.

    History: each call with `advance=True` (the default) records the raw losses as step t. With
    gradient accumulation, call with `advance=False` on every micro-batch and then `step_end(losses)`
    once per optimizer step (e.g. with the micro-batch mean). Under torch.distributed
    (`sync_distributed=True`) the detached losses are averaged across ranks first, so every rank uses
    the same weights and keeps the same history. A call whose losses are not all finite leaves the
    history unchanged (the caller is expected to skip that step).
    """

    def __init__(
        self,
        names: Sequence[str],
        mode: str = "dynamic",
        temperature: float = 1.0,
        fixed_weights: dict[str, float] | None = None,
        eps: float = 1e-8,
        max_weight: float = 0.0,
        sync_distributed: bool = True,
        task_share: float = 0.5,
        calibration_steps: int = 20,
        window: int = 20,
        task_share_end: float | None = None,
        total_steps: int = 0,
    ):
        self.names = tuple(names)
        if not self.names:
            raise ValueError("the loss balancer needs at least one loss term")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate loss names in {list(self.names)}")
        if mode not in BALANCER_MODES:
            raise ValueError(f"mode must be one of {BALANCER_MODES}, got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mode = mode
        self.temperature = float(temperature)
        self.eps = float(eps)
        self.max_weight = float(max_weight)
        self.sync_distributed = sync_distributed
        if not 0.0 <= task_share < 1.0:
            raise ValueError(f"task_share must be in [0, 1), got {task_share}")
        if calibration_steps < 1 or window < 1:
            raise ValueError("calibration_steps and window must be >= 1")
        if task_share_end is not None and not 0.0 <= task_share_end <= 1.0:
            raise ValueError(f"task_share_end must be in [0, 1], got {task_share_end}")
        self.task_share = float(task_share)
        self.task_share_end = None if task_share_end is None else float(task_share_end)
        self.total_steps = int(total_steps)  # set by the training loop; the task_share schedule's length
        self.calibration_steps = int(calibration_steps)
        self.window = int(window)
        self.priors = {name: float((fixed_weights or {}).get(name, 1.0)) for name in self.names if name != "task"}
        if self.priors:
            mean_prior = sum(self.priors.values()) / len(self.priors)
            self.priors = {k: v / mean_prior for k, v in self.priors.items()}
        # calibrated state: reference sums over the first calibration_steps, fast and slow EMAs
        self.reference_sum = [0.0] * len(self.names)
        self.fast: list[float] | None = None
        self.slow: list[float] | None = None
        self.fixed_weights: dict[str, float] = {}
        if mode == "fixed":
            given = fixed_weights or {}
            missing = [name for name in self.names if name not in given]
            if missing:
                raise ValueError(
                    f"weights: mode 'fixed' needs a weight for every enabled loss; "
                    f"missing {missing} (enabled: {list(self.names)})"
                )
            self.fixed_weights = {name: float(given[name]) for name in self.names}
        # raw losses of the last two recorded steps, oldest first, in `names` order
        self.history: list[list[float]] = []
        self.steps = 0  # recorded steps


    # ---- weights -----------------------------------------------------------------------------
    def _raw_values(self, losses: dict[str, Tensor]) -> list[float]:
        unknown = sorted(set(losses) - set(self.names))
        missing = [name for name in self.names if name not in losses]
        if unknown or missing:
            raise ValueError(f"loss balancer expects losses {list(self.names)}; missing {missing}, unexpected {unknown}")
        stacked = torch.stack([losses[name].detach().float().reshape(()) for name in self.names])
        if self.sync_distributed and runtime.world_size() > 1:
            if dist.get_backend() == "nccl":
                stacked = stacked.cuda()  # NCCL reduces GPU tensors only (step_end may pass floats)
            stacked = stacked.clone()
            dist.all_reduce(stacked)
            stacked /= runtime.world_size()
        return stacked.tolist()  # one device sync for all terms

    def rates(self) -> list[float]:
        """r_i = L_i(t-1) / L_i(t-2) from the history (1 where undefined)."""
        if len(self.history) < 2:
            return [1.0] * len(self.names)
        older, newer = self.history[-2], self.history[-1]
        return [new / old if old > self.eps else 1.0 for new, old in zip(newer, older)]

    def weights_for(self, values: Sequence[float]) -> list[float]:
        """The weights for raw loss values (in `names` order) given the current history."""
        if self.mode == "uniform":
            return [1.0] * len(self.names)
        if self.mode == "fixed":
            return [self.fixed_weights[name] for name in self.names]
        if self.mode == "calibrated":
            return self._calibrated_weights(values)
        largest = max(values)
        if self.mode == "authors":
            return [10.0 / len(self.names) * largest / (value + self.eps) for value in values]
        magnitude = [largest / (value + self.eps) for value in values]
        scaled = [rate / self.temperature for rate in self.rates()]
        top = max(scaled)
        exps = [math.exp(s - top) for s in scaled]
        softmax = [e / sum(exps) for e in exps]
        n = len(self.names)
        weights = [n * p * m for p, m in zip(softmax, magnitude)]
        if self.max_weight > 0:
            weights = [min(w, self.max_weight) for w in weights]
        return weights

    def references(self, values: Sequence[float]) -> list[float]:
        """ref_i: the mean over the calibration steps recorded so far (the current value before any)."""
        seen = min(self.steps, self.calibration_steps)
        if seen == 0:
            return [max(v, self.eps) for v in values]
        return [max(total / seen, self.eps) for total in self.reference_sum]

    def current_task_share(self) -> float:
        """task_share, moving linearly to task_share_end over total_steps when a schedule is set."""
        if self.task_share_end is None or self.total_steps <= 0:
            return self.task_share
        progress = min(1.0, self.steps / self.total_steps)
        return self.task_share + (self.task_share_end - self.task_share) * progress

    def _calibrated_weights(self, values: Sequence[float]) -> list[float]:
        refs = self.references(values)
        distill = [i for i, name in enumerate(self.names) if name != "task"]
        share = self.current_task_share() if len(distill) < len(self.names) else 0.0
        rates = [1.0] * len(self.names) if self.fast is None else [
            f / s if s > self.eps else 1.0 for f, s in zip(self.fast, self.slow)
        ]
        weights = [0.0] * len(self.names)
        if distill:
            top = max(rates[i] / self.temperature for i in distill)
            exps = {i: math.exp(rates[i] / self.temperature - top) for i in distill}
            total = sum(exps.values())
            for i in distill:
                weights[i] = (1.0 - share) * exps[i] / total * self.priors[self.names[i]] / refs[i]
        for i, name in enumerate(self.names):
            if name == "task":
                weights[i] = (share if distill else 1.0) / refs[i]
        return weights

    # ---- the objective -----------------------------------------------------------------------
    def __call__(self, losses: dict[str, Tensor], advance: bool = True) -> tuple[Tensor, dict[str, float]]:
        """(total, weights used): total = sum_i w_i L_i with the w_i as constants."""
        values = self._raw_values(losses)
        finite = all(math.isfinite(v) for v in values)
        # non-finite losses: weight 1, so the total stays non-finite and the caller notices
        weights = self.weights_for(values) if finite else [1.0] * len(self.names)
        total = sum(weight * losses[name] for name, weight in zip(self.names, weights))
        if advance and finite:
            self._record(values)
        return total, dict(zip(self.names, weights))

    def step_end(self, losses: dict[str, Tensor | float]) -> None:
        """Record one optimizer step's raw losses (use with `advance=False` under accumulation)."""
        tensors = {k: v if isinstance(v, Tensor) else torch.tensor(float(v)) for k, v in losses.items()}
        values = self._raw_values(tensors)
        if all(math.isfinite(v) for v in values):
            self._record(values)

    def _record(self, values: list[float]) -> None:
        self.history = (self.history + [list(values)])[-2:]
        if self.steps < self.calibration_steps:
            self.reference_sum = [total + v for total, v in zip(self.reference_sum, values)]
        if self.fast is None:
            self.fast, self.slow = list(values), list(values)
        else:
            a_fast, a_slow = 1.0 / self.window, 1.0 / (4 * self.window)
            self.fast = [f + a_fast * (v - f) for f, v in zip(self.fast, values)]
            self.slow = [s + a_slow * (v - s) for s, v in zip(self.slow, values)]
        self.steps += 1

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain Python values only, so it survives torch.save / torch.load(weights_only=True)."""
        return {
            "names": list(self.names),
            "mode": self.mode,
            "temperature": self.temperature,
            "history": [list(row) for row in self.history],
            "steps": self.steps,
            "reference_sum": list(self.reference_sum),
            "fast": None if self.fast is None else list(self.fast),
            "slow": None if self.slow is None else list(self.slow),
        }

    def load_state_dict(self, state: dict) -> None:
        names = list(state.get("names", []))
        if names != list(self.names):
            raise ValueError(
                f"loss balancer checkpoint is for losses {names}, this run has {list(self.names)}"
            )
        history = [[float(v) for v in row] for row in state.get("history", [])]
        if any(len(row) != len(self.names) for row in history):
            raise ValueError("loss balancer checkpoint: history rows do not match the loss names")
        self.history = history[-2:]
        self.steps = int(state.get("steps", len(history)))
        self.reference_sum = [float(v) for v in state.get("reference_sum", [0.0] * len(self.names))]
        self.fast = None if state.get("fast") is None else [float(v) for v in state["fast"]]
        self.slow = None if state.get("slow") is None else [float(v) for v in state["slow"]]
