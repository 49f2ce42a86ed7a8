"""The loss balancer: magnitude equalisation, DWA rates, detached weights, fixed/uniform, resume."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.common.config import ConfigError

from pipeline.common.params import BalancerConfig
from pipeline.common.errors import PipelineError
from pipeline.training.balancer import LossBalancer

NAMES = ("feature", "contrastive", "hard_negative")


def as_losses(values, names=NAMES):
    return {name: torch.tensor(float(v)) for name, v in zip(names, values)}


def test_first_steps_scale_every_term_to_the_largest():
    balancer = LossBalancer(NAMES)
    for values in ([0.02, 7.0, 0.5], [0.01, 6.0, 0.4]):  # no two-step history yet: rates are 1
        total, weights = balancer(as_losses(values))
        for name, value in zip(NAMES, values):
            assert weights[name] * value == pytest.approx(max(values), rel=1e-6)
        assert total.item() == pytest.approx(len(NAMES) * max(values), rel=1e-6)


def test_equal_rates_keep_contributions_equal():
    balancer = LossBalancer(NAMES)
    values = [0.5, 8.0, 2.0]
    for _ in range(4):  # every term halves each step: equal rates
        _, weights = balancer(as_losses(values))
        contributions = [weights[n] * v for n, v in zip(NAMES, values)]
        assert contributions == pytest.approx([max(values)] * 3, rel=1e-6)
        values = [v / 2 for v in values]


def test_slowly_falling_term_gets_more_weight():
    names = ("slow", "fast")
    balancer = LossBalancer(names, temperature=0.5)
    balancer(as_losses([1.0, 1.0], names))
    balancer(as_losses([0.9, 0.5], names))  # slow: rate .9, fast: rate .5
    _, weights = balancer(as_losses([0.8, 0.8], names))  # equal magnitudes now: only the rates differ
    assert weights["slow"] > weights["fast"]
    # exact: w_i = n softmax(r / T)_i m_i with m = 1
    expected_slow = 2 * math.exp(0.9 / 0.5) / (math.exp(0.9 / 0.5) + math.exp(0.5 / 0.5))
    assert weights["slow"] == pytest.approx(expected_slow, rel=1e-6)
    assert weights["slow"] + weights["fast"] == pytest.approx(2.0, rel=1e-6)


def test_dynamic_weights_match_formula_with_magnitudes_and_rates():
    balancer = LossBalancer(NAMES, temperature=2.0)
    history = [[1.0, 4.0, 0.5], [0.7, 3.9, 0.6]]
    for values in history:
        balancer(as_losses(values))
    current = [0.3, 3.0, 0.1]
    _, weights = balancer(as_losses(current))
    rates = [b / a for a, b in zip(*history)]
    softmax = torch.softmax(torch.tensor(rates, dtype=torch.float64) / 2.0, dim=0).tolist()
    for i, name in enumerate(NAMES):
        assert weights[name] == pytest.approx(3 * softmax[i] * max(current) / current[i], rel=1e-6)


def test_weights_carry_no_gradient():
    x = torch.tensor(0.5, requires_grad=True)
    y = torch.tensor(2.0, requires_grad=True)
    balancer = LossBalancer(("a", "b"))
    total, weights = balancer({"a": x**2, "b": 3 * y})
    total.backward()
    # as constants: d(w_a x^2)/dx = 2 w_a x, d(w_b 3y)/dy = 3 w_b (w_a = max/L_a would add terms otherwise)
    assert x.grad.item() == pytest.approx(2 * weights["a"] * 0.5, rel=1e-6)
    assert y.grad.item() == pytest.approx(3 * weights["b"], rel=1e-6)
    assert all(isinstance(w, float) for w in weights.values())


def test_uniform_and_fixed():
    losses = as_losses([0.2, 3.0, 1.0])
    total, weights = LossBalancer(NAMES, mode="uniform")(losses)
    assert weights == {n: 1.0 for n in NAMES} and total.item() == pytest.approx(4.2)
    fixed = {"feature": 50.0, "contrastive": 20.0, "hard_negative": 0.001, "task": 9.0}  # task: not enabled, ignored
    total, weights = LossBalancer(NAMES, mode="fixed", fixed_weights=fixed)(losses)
    assert weights == {n: fixed[n] for n in NAMES}
    assert total.item() == pytest.approx(50 * 0.2 + 20 * 3.0 + 0.001 * 1.0)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"missing \['hard_negative'\]"):
        LossBalancer(NAMES, mode="fixed", fixed_weights={"feature": 1.0, "contrastive": 1.0})
    with pytest.raises(ValueError, match="mode"):
        LossBalancer(NAMES, mode="adaptive")
    with pytest.raises(ValueError, match="temperature"):
        LossBalancer(NAMES, temperature=0.0)
    with pytest.raises(ValueError, match=r"missing \['hard_negative'\]"):
        LossBalancer(NAMES)(as_losses([1.0, 2.0], NAMES[:2]))


def test_advance_false_and_step_end_for_accumulation():
    balancer = LossBalancer(("a", "b"))
    balancer({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}, advance=False)
    assert balancer.history == [] and balancer.steps == 0
    balancer.step_end({"a": 1.0, "b": 1.0})
    balancer.step_end({"a": 0.5, "b": 1.0})  # a halves, b is flat
    assert balancer.steps == 2 and balancer.rates() == [0.5, 1.0]
    _, weights = balancer({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}, advance=False)
    assert weights["b"] > weights["a"]
    assert balancer.rates() == [0.5, 1.0]  # unchanged by advance=False


def test_non_finite_losses_do_not_enter_history():
    balancer = LossBalancer(("a", "b"))
    balancer({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    total, _ = balancer({"a": torch.tensor(float("nan")), "b": torch.tensor(2.0)})
    assert not torch.isfinite(total)
    assert balancer.history == [[1.0, 2.0]]


def test_zero_loss_rate_and_weight_cap():
    balancer = LossBalancer(("a", "b"), max_weight=100.0)
    balancer({"a": torch.tensor(0.0), "b": torch.tensor(1.0)})
    balancer({"a": torch.tensor(0.5), "b": torch.tensor(1.0)})
    assert balancer.rates() == [1.0, 1.0]  # a's rate from a zero loss is undefined: 1
    _, weights = balancer({"a": torch.tensor(1e-6), "b": torch.tensor(1.0)})
    assert weights["a"] == 100.0 and weights["b"] == pytest.approx(1.0)


def test_the_config_reaches_the_balancer_only_through_the_factory_and_its_modes_agree(tmp_path):
    from pipeline.common.params import BalancerMode, DistillConfig, TrainConfig
    from pipeline.training import balancer as balancer_mod, loop
    assert set(balancer_mod.BALANCER_MODES) == {m.value for m in BalancerMode}
    cfg = TrainConfig(distill=DistillConfig(feature=False, similarity=False, contrastive=False, hard_negative=False,
                                            balancer=BalancerConfig(mode="fixed", weights={"task": 2.0})))
    _, _, built = loop.create_losses(cfg, teacher_dim=8, total_steps=10)
    _, weights = built({"task": torch.tensor(1.0)})
    assert weights == {"task": 2.0} and built.total_steps == 10
    # a bad value is one error naming where it came from
    cfg.distill.balancer = BalancerConfig(mode="fixed", weights={})
    with pytest.raises(ConfigError, match=r"train.distill.balancer: weights: mode 'fixed' needs a weight"):
        loop.create_losses(cfg, teacher_dim=8, total_steps=10)


def test_state_dict_round_trip(tmp_path):
    sequence = [[1.0, 5.0, 0.3], [0.8, 4.0, 0.31], [0.5, 3.9, 0.2], [0.45, 3.0, 0.25], [0.3, 2.0, 0.2]]
    uninterrupted = LossBalancer(NAMES)
    first = LossBalancer(NAMES)
    for values in sequence[:3]:
        uninterrupted(as_losses(values))
        first(as_losses(values))
    torch.save({"balancer": first.state_dict()}, tmp_path / "checkpoint.pt")
    resumed = LossBalancer(NAMES)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["balancer"])
    assert resumed.steps == 3
    for values in sequence[3:]:
        _, expected = uninterrupted(as_losses(values))
        _, got = resumed(as_losses(values))
        assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="checkpoint is for losses"):
        LossBalancer(NAMES[:2]).load_state_dict(first.state_dict())


def calibrated_reference(history, names, task_share, calibration_steps, window, temperature=1.0, priors=None):
    """The calibrated weights after `history` (raw loss rows), written out step by step."""
    refs = [sum(row[i] for row in history[:calibration_steps]) / min(len(history), calibration_steps) for i in range(len(names))]
    fast, slow = list(history[0]), list(history[0])
    for row in history[1:]:
        fast = [f + (v - f) / window for f, v in zip(fast, row)]
        slow = [s + (v - s) / (4 * window) for s, v in zip(slow, row)]
    distill = [i for i, n in enumerate(names) if n != "task"]
    exps = {i: math.exp(fast[i] / slow[i] / temperature) for i in distill}
    priors = priors or {}
    mean_prior = sum(priors.get(names[i], 1.0) for i in distill) / len(distill)
    weights = {}
    for i, name in enumerate(names):
        if name == "task":
            weights[name] = task_share / refs[i]
        else:
            weights[name] = (1 - task_share) * exps[i] / sum(exps.values()) * priors.get(name, 1.0) / mean_prior / refs[i]
    return weights


def test_calibrated_weights_match_the_formula_and_stay_bounded():
    names = ("feature", "contrastive", "task")
    balancer = LossBalancer(names, mode="calibrated", task_share=0.4, calibration_steps=3, window=2,
                            fixed_weights={"feature": 3.0})
    history = []
    values = [0.2, 9.0, 5.0]
    for step in range(12):
        _, weights = balancer(as_losses(values, names))
        if history:
            expected = calibrated_reference(history, names, 0.4, 3, 2, priors={"feature": 3.0})
            assert weights == pytest.approx(expected, rel=1e-6)  # losses pass through float32
        history.append(list(values))
        values = [values[0] * 0.5, values[1] * 0.9, values[2] * 0.8]  # the feature term collapses towards 0
    # the references froze after 3 steps: a vanishing term keeps its weight instead of growing as 1 / L
    assert weights["feature"] < 2 * calibrated_reference(history[:4], names, 0.4, 3, 2, priors={"feature": 3.0})["feature"]


def test_calibrated_task_share_and_its_schedule():
    names = ("feature", "task")
    balancer = LossBalancer(names, mode="calibrated", task_share=0.3, task_share_end=0.9, calibration_steps=1, total_steps=10)
    contributions = []
    for _ in range(11):
        values = [0.4, 2.0]  # constant losses: contribution w_i L_i / total is the share
        total, weights = balancer(as_losses(values, names))
        contributions.append(weights["task"] * 2.0 / float(total))
    assert contributions[1] == pytest.approx(0.3 + 0.6 * 1 / 10, rel=1e-6)
    assert contributions[-1] == pytest.approx(0.9, rel=1e-6)
    assert all(a <= b + 1e-12 for a, b in zip(contributions, contributions[1:]))


def test_authors_rule_is_magnitude_equalisation_times_k_over_n():
    balancer = LossBalancer(NAMES, mode="authors")
    values = [0.02, 7.0, 0.5]
    for _ in range(3):
        _, weights = balancer(as_losses(values))
        assert [weights[n] for n in NAMES] == pytest.approx([10 / 3 * 7.0 / v for v in values], rel=1e-6)
