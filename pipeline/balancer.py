"""Weighting the DSMD loss terms into one objective: dynamic self-adaptive, fixed or uniform."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.config import ConfigError

BALANCER_MODES = ("dynamic", "fixed", "uniform")


class LossBalancer:
    """total = sum_i w_i L_i over the named terms, with weights that carry no gradient.

    Modes:
    - `uniform`: w_i = 1.
    - `fixed`: w_i = fixed_weights[name] (every name needs one; weights of other names are
      ignored, so a term can be switched off without editing them).
    - `dynamic`: magnitude equalisation times Dynamic Weight Average (DWA) rates:

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
    ):
        self.names = tuple(names)
        if not self.names:
            raise ConfigError("the loss balancer needs at least one loss term")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"loss balancer: duplicate loss names in {list(self.names)}")
        if mode not in BALANCER_MODES:
            raise ConfigError(f"train.distill.balancer.mode must be one of {BALANCER_MODES}, got {mode!r}")
        if not temperature > 0:
            raise ConfigError(f"train.distill.balancer.temperature must be > 0, got {temperature}")
        self.mode = mode
        self.temperature = float(temperature)
        self.eps = float(eps)
        self.max_weight = float(max_weight)
        self.sync_distributed = sync_distributed
        self.fixed_weights: dict[str, float] = {}
        if mode == "fixed":
            given = fixed_weights or {}
            missing = [name for name in self.names if name not in given]
            if missing:
                raise ConfigError(
                    f"train.distill.balancer.weights: mode 'fixed' needs a weight for every enabled loss; "
                    f"missing {missing} (enabled: {list(self.names)})"
                )
            self.fixed_weights = {name: float(given[name]) for name in self.names}
        # raw losses of the last two recorded steps, oldest first, in `names` order
        self.history: list[list[float]] = []
        self.steps = 0  # recorded steps

    @classmethod
    def from_config(cls, names: Sequence[str], config) -> "LossBalancer":
        """From `pipeline.config.BalancerConfig` (train.distill.balancer)."""
        return cls(names, mode=config.mode, temperature=config.temperature, fixed_weights=config.weights,
                   max_weight=config.max_weight)

    # ---- weights -----------------------------------------------------------------------------
    def _raw_values(self, losses: dict[str, Tensor]) -> list[float]:
        unknown = sorted(set(losses) - set(self.names))
        missing = [name for name in self.names if name not in losses]
        if unknown or missing:
            raise ValueError(f"loss balancer expects losses {list(self.names)}; missing {missing}, unexpected {unknown}")
        stacked = torch.stack([losses[name].detach().float().reshape(()) for name in self.names])
        if self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                stacked = stacked.cuda()  # NCCL reduces GPU tensors only (step_end may pass floats)
            stacked = stacked.clone()
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
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
        largest = max(values)
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
