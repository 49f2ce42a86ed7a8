"""The DSMD losses against hand-computed values and explicit Python loops on tiny tensors."""
from __future__ import annotations

import math
import os
import socket

import open_clip.loss
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.common.params import DistillConfig
from pipeline.training.losses import (
    DISTILL_NAMES,
    Mined,
    AffinityDistillLoss,
    ClipLoss,
    ContrastiveDistillLoss,
    DSMDLoss,
    FeatureDistillLoss,
    HardNegativeDistillLoss,
    SimilarityDistillLoss,
    TeacherQueue,
    gather_no_grad,
    gather_with_grad,
)


def unit(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def batch(b=5, d=4, seed=0):
    return [unit(b, d, seed=seed + k) for k in range(4)]  # s_v, s_t, t_v, t_t


# ---- feature and similarity --------------------------------------------------------------------
def test_feature_loss_exact_value():
    s_v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t_v = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # |diff| = [[1, 1], [0, 0]] -> mean 0.5
    s_t = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    t_t = torch.tensor([[0.8, 0.6], [1.0, 0.0]])  # |diff| = [[.2, .2], [0, 0]] -> mean 0.1
    assert FeatureDistillLoss()(s_v, s_t, t_v, t_t).item() == pytest.approx(0.6)


def test_feature_loss_matches_loop():
    s_v, s_t, t_v, t_t = batch(3, 4)
    expected = sum(abs(s_v[i, d] - t_v[i, d]) for i in range(3) for d in range(4)) / 12
    expected += sum(abs(s_t[i, d] - t_t[i, d]) for i in range(3) for d in range(4)) / 12
    assert FeatureDistillLoss()(s_v, s_t, t_v, t_t).item() == pytest.approx(expected.item())


def test_similarity_loss_exact_value():
    s_v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t_v = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # cos = 0, 1 -> mean .5 -> 1 - 1.5/2 = .25
    s_t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t_t = -s_t  # cos = -1 -> 1 - 0/2 = 1
    assert SimilarityDistillLoss()(s_v, s_t, t_v, t_t).item() == pytest.approx(1.25)
    assert SimilarityDistillLoss()(s_v, s_t, s_v, s_t).item() == pytest.approx(0.0, abs=1e-7)


# ---- the teacher queue -------------------------------------------------------------------------
def rows(ids, dim=2):
    """Embeddings whose first coordinate encodes the id, so positions can be read back."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    image = torch.zeros(len(ids), dim)
    image[:, 0] = ids.float()
    return image, -image, ids


def test_queue_fifo_order_and_wrap_around():
    queue = TeacherQueue(size=4, dim=2)
    assert int(queue.num_valid) == 0 and (queue.owner_ids == -1).all()
    queue.enqueue(*rows([10, 11, 12]))
    assert queue.owner_ids.tolist() == [10, 11, 12, -1]
    assert int(queue.ptr) == 3 and int(queue.num_valid) == 3
    queue.enqueue(*rows([13, 14, 15]))  # wraps: the oldest entries (10, 11) are overwritten first
    assert queue.owner_ids.tolist() == [14, 15, 12, 13]
    assert queue.image[:, 0].tolist() == [14, 15, 12, 13]
    assert queue.text[:, 0].tolist() == [-14, -15, -12, -13]
    assert int(queue.ptr) == 2 and int(queue.num_valid) == 4


def test_queue_skips_invalid_rows_and_keeps_last_k_of_a_long_batch():
    queue = TeacherQueue(size=4, dim=2)
    queue.enqueue(*rows([1, -1, 2]))
    assert queue.owner_ids.tolist() == [1, 2, -1, -1] and int(queue.num_valid) == 2
    queue.enqueue(*rows([3, 4, 5, 6, 7]))  # more than K: same result as enqueueing one by one
    one_by_one = TeacherQueue(size=4, dim=2)
    for i in [1, 2, 3, 4, 5, 6, 7]:
        one_by_one.enqueue(*rows([i]))
    assert queue.owner_ids.tolist() == one_by_one.owner_ids.tolist() == [5, 6, 7, 4]
    assert int(queue.ptr) == int(one_by_one.ptr) == 3
    assert torch.equal(queue.image, one_by_one.image)


def test_queue_prefill_replaces_contents():
    queue = TeacherQueue(size=4, dim=2)
    queue.enqueue(*rows([1, 2, 3]))
    queue.prefill(*rows([20, 21]))
    assert queue.owner_ids.tolist() == [20, 21, -1, -1]
    assert queue.image[:, 0].tolist() == [20, 21, 0, 0]
    assert int(queue.ptr) == 2 and int(queue.num_valid) == 2


def test_queue_state_dict_round_trip(tmp_path):
    queue = TeacherQueue(size=5, dim=3)
    queue.enqueue(unit(7, 3), unit(7, 3, seed=1), torch.arange(7))
    torch.save(queue.state_dict(), tmp_path / "queue.pt")
    resumed = TeacherQueue(size=5, dim=3)
    resumed.load_state_dict(torch.load(tmp_path / "queue.pt", weights_only=True))
    for name, value in queue.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    new_rows = (unit(2, 3, seed=5), unit(2, 3, seed=6), torch.tensor([40, 41]))
    queue.enqueue(*new_rows)
    resumed.enqueue(*new_rows)
    assert torch.equal(queue.owner_ids, resumed.owner_ids) and torch.equal(queue.image, resumed.image)


# ---- contrastive distillation ------------------------------------------------------------------
def contrastive_loop(s_v, s_t, t_v, t_t, image_ids, queue, tau):
    total = 0.0
    for student, teacher, bank in ((s_v, t_v, queue.image), (s_t, t_t, queue.text)):
        per_sample = []
        for i in range(student.shape[0]):
            logits = [float(student[i] @ teacher[i]) / tau]
            for k in range(queue.size):
                owner = int(queue.owner_ids[k])
                if owner == -1 or owner == int(image_ids[i]):
                    continue
                logits.append(float(student[i] @ bank[k].double()) / tau)
            top = max(logits)
            per_sample.append(-(logits[0] - top - math.log(sum(math.exp(x - top) for x in logits))))
        total += sum(per_sample) / len(per_sample)
    return total


def filled_queue():
    queue = TeacherQueue(size=6, dim=4)
    # owners: two entries of image 1 (a batch image), one of image 7, two others, one slot left empty
    queue.enqueue(unit(5, 4, seed=10).float(), unit(5, 4, seed=11).float(), torch.tensor([1, 7, 8, 1, 9]))
    return queue


def test_contrastive_matches_loop_with_masking():
    s_v, s_t, t_v, t_t = batch(3, 4)
    image_ids = torch.tensor([1, 2, 7])
    queue = filled_queue()
    tau = 0.1
    got = ContrastiveDistillLoss(tau)(s_v, s_t, t_v, t_t, image_ids, queue).item()
    assert got == pytest.approx(contrastive_loop(s_v, s_t, t_v, t_t, image_ids, queue, tau), rel=1e-5)


def test_contrastive_masked_entries_do_not_change_the_value():
    s_v, s_t, t_v, t_t = batch(3, 4)
    loss = ContrastiveDistillLoss(0.05)
    own_image = torch.tensor([1, 1, 1])  # queue slots 0 and 3 belong to image 1; slot 5 is empty
    other_images = torch.tensor([2, 3, 4])
    queue = filled_queue()
    masked_before = loss(s_v, s_t, t_v, t_t, own_image, queue).item()
    unmasked_before = loss(s_v, s_t, t_v, t_t, other_images, queue).item()
    for slot in (0, 3, 5):
        queue.image[slot] = s_v[0].float()  # as hard as a negative can be
        queue.text[slot] = s_t[0].float()
    assert loss(s_v, s_t, t_v, t_t, own_image, queue).item() == pytest.approx(masked_before, rel=1e-6)
    # for samples of other images slots 0 and 3 are real negatives, so the value moves
    assert loss(s_v, s_t, t_v, t_t, other_images, queue).item() > unmasked_before + 1e-3


def test_contrastive_empty_queue_is_zero_and_hard_queue_raises_loss():
    s_v, s_t, t_v, t_t = batch(3, 4)
    image_ids = torch.tensor([0, 1, 2])
    loss = ContrastiveDistillLoss(0.05)
    queue = TeacherQueue(size=4, dim=4)
    assert loss(s_v, s_t, t_v, t_t, image_ids, queue).item() == pytest.approx(0.0, abs=1e-12)
    queue.prefill(-s_v.float(), -s_t.float(), torch.tensor([5, 6, 7]))  # negatives opposite the students
    easy = loss(s_v, s_t, t_v, t_t, image_ids, queue).item()
    queue.prefill(s_v.float(), s_t.float(), torch.tensor([5, 6, 7]))  # negatives equal to the students
    hard = loss(s_v, s_t, t_v, t_t, image_ids, queue).item()
    assert 0 < easy < hard


# ---- hard-negative distillation ----------------------------------------------------------------
def triplet_loop(a, b, ids, margin, mined=None, mined_ids=None, teacher_a=None):
    """Explicit VSE++ max-violation loop; returns per-anchor costs. With `teacher_a` (the teacher's
    embedding of each anchor) the margin of each pair is the teacher's own gap, and pairs the
    teacher misorders (gap <= 0) cost nothing."""

    def cost(i_anchor, score, pos, teacher_score, teacher_pos):
        if teacher_a is None:
            return max(0.0, margin + score - pos)
        gap = teacher_pos - teacher_score
        return max(0.0, gap + score - pos) if gap > 0 else 0.0

    def g(i, vec):  # the teacher's score of anchor i against vec
        return None if teacher_a is None else float(teacher_a[i] @ vec)

    n = a.shape[0]
    costs = []
    for i in range(n):
        pos = float(a[i] @ b[i])
        row = [0.0]
        for j in range(n):
            if int(ids[j]) != int(ids[i]):
                row.append(cost(i, float(a[i] @ b[j]), pos, g(i, b[j]), g(i, b[i])))
        if mined is not None:
            for h in range(mined.shape[1]):
                if int(mined_ids[i, h]) not in (-1, int(ids[i])):
                    row.append(cost(i, float(a[i] @ mined[i, h]), pos, g(i, mined[i, h]), g(i, b[i])))
        column = [0.0]
        for j in range(n):
            if int(ids[j]) != int(ids[i]):
                column.append(cost(j, float(a[j] @ b[i]), pos, g(j, b[i]), g(i, b[i])))
        costs.append(max(row) + max(column))
    return costs


def test_triplet_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    # S = [[1, .8], [0, .6]]; rows: [.2+.8-1]+ = 0, [.2+0-.6]+ = 0; columns: [.2+0-1]+ = 0, [.2+.8-.6]+ = .4
    ids = torch.tensor([0, 1])
    assert HardNegativeDistillLoss(0.2, "sum").triplet(a, b, ids).item() == pytest.approx(0.4)
    assert HardNegativeDistillLoss(0.2, "mean").triplet(a, b, ids).item() == pytest.approx(0.2)
    # both samples of the same image: no negatives at all
    assert HardNegativeDistillLoss(0.2, "sum").triplet(a, b, torch.tensor([3, 3])).item() == 0.0
    # a mined negative for anchor 1 harder than anything in the batch: [.2 + .8 - .6]+ = .4 more
    mined = torch.tensor([[[0.0, 1.0]], [[0.6, 0.8]]])
    mined_ids = torch.tensor([[-1], [5]])
    assert HardNegativeDistillLoss(0.2, "sum").triplet(a, b, ids, Mined(mined, mined_ids)).item() == pytest.approx(0.8)
    # anchor 0's mined entry (which would violate by .2 + 0 - 1 -> 0 anyway) is padding; anchor 1's
    # mined entry is ignored when it is padding or belongs to anchor 1's own image
    for ignored in (-1, 1):
        masked_ids = torch.tensor([[-1], [ignored]])
        assert HardNegativeDistillLoss(0.2, "sum").triplet(a, b, ids, Mined(mined, masked_ids)).item() == pytest.approx(0.4)


def hn_inputs(seed=0):
    s_v, s_t, t_v, t_t = batch(6, 4, seed=seed)
    image_ids = torch.tensor([0, 1, 1, 2, 3, 3])  # images 1 and 3 twice (two captions each)
    mined_image = unit(6, 3, 4, seed=seed + 20)
    mined_text = unit(6, 3, 4, seed=seed + 21)
    mined_image_ids = torch.tensor([[1, 10, -1], [11, 0, 12], [1, -1, -1], [13, 14, 15], [16, 3, 17], [18, 19, 2]])
    mined_text_ids = torch.tensor([[20, 21, 22], [1, 23, -1], [24, 25, 26], [-1, -1, -1], [3, 27, 28], [29, 0, 30]])
    return (s_v, s_t, t_v, t_t, image_ids), (mined_image, mined_text, mined_image_ids, mined_text_ids)


@pytest.mark.parametrize("margin_mode", ["fixed", "teacher"])
@pytest.mark.parametrize("use_mined", [False, True])
def test_hard_negative_matches_loop(use_mined, margin_mode):
    (s_v, s_t, t_v, t_t, ids), (m_v, m_t, m_v_ids, m_t_ids) = hn_inputs()
    # text anchors have lists of their own (t2t, t2i), here other tensors than the image anchors'
    (_, _, _, _, _), (m_ti, m_tt, m_ti_ids, m_tt_ids) = hn_inputs(seed=9)
    margin = 0.3
    if not use_mined:
        m_v = m_t = m_v_ids = m_t_ids = m_ti = m_tt = m_ti_ids = m_tt_ids = None
    teacher = margin_mode == "teacher"
    expected = []
    for anchor, positive, mined, mined_ids, teacher_anchor in (
        (s_v, t_v, m_v, m_v_ids, t_v), (s_t, t_t, m_tt, m_tt_ids, t_t), (s_v, t_t, m_t, m_t_ids, t_v), (s_t, t_v, m_ti, m_ti_ids, t_t)
    ):
        expected.append(triplet_loop(anchor, positive, ids, margin, mined, mined_ids, teacher_anchor if teacher else None))
    total_sum = sum(sum(costs) for costs in expected)
    mined = None if not use_mined else {
        "i2i": Mined(m_v, m_v_ids), "i2t": Mined(m_t, m_t_ids), "t2t": Mined(m_tt, m_tt_ids), "t2i": Mined(m_ti, m_ti_ids)}
    args = (s_v, s_t, t_v, t_t, ids, mined)
    summed = HardNegativeDistillLoss(margin, "sum", margin_mode)(*args)
    averaged = HardNegativeDistillLoss(margin, "mean", margin_mode)(*args)
    assert summed.item() == pytest.approx(total_sum, rel=1e-9)
    assert averaged.item() == pytest.approx(total_sum / 6, rel=1e-9)
    assert total_sum > 0


def test_teacher_margin_costs_nothing_for_a_student_equal_to_the_teacher():
    (s_v, s_t, t_v, t_t, ids), (m_v, m_t, m_v_ids, m_t_ids) = hn_inputs(seed=4)
    mined = ({"i2i": Mined(m_v, m_v_ids), "i2t": Mined(m_t, m_t_ids), "t2t": Mined(m_t, m_t_ids), "t2i": Mined(m_v, m_v_ids)},)
    teacher_margin = HardNegativeDistillLoss(0.2, margin_mode="teacher")
    assert teacher_margin(t_v, t_t, t_v, t_t, ids, *mined).item() == pytest.approx(0.0, abs=1e-12)
    assert HardNegativeDistillLoss(0.2, margin_mode="fixed")(t_v, t_t, t_v, t_t, ids, *mined).item() > 0.1
    assert teacher_margin(s_v, s_t, t_v, t_t, ids, *mined).item() > 0  # a student unlike the teacher pays


def test_hard_negative_mined_harder_than_batch_raises_loss():
    (s_v, s_t, t_v, t_t, ids), _ = hn_inputs(seed=3)
    loss = HardNegativeDistillLoss(0.2)
    base = loss(s_v, s_t, t_v, t_t, ids).item()
    # each sample's mined negative is its own student embedding's direction: the hardest possible
    mined_image, mined_text = s_v[:, None, :].clone(), s_t[:, None, :].clone()
    mined_ids = torch.full((6, 1), 100)
    harder = loss(s_v, s_t, t_v, t_t, ids, {"i2i": Mined(mined_image, mined_ids), "i2t": Mined(mined_text, mined_ids)}).item()
    assert harder > base
    padding = torch.full((6, 1), -1)
    padded = loss(s_v, s_t, t_v, t_t, ids, {"i2i": Mined(mined_image, padding), "i2t": Mined(mined_text, padding)}).item()
    assert padded == pytest.approx(base)


def test_same_image_pairs_are_not_negatives():
    s_v, s_t, t_v, t_t = batch(4, 4, seed=7)
    loss = HardNegativeDistillLoss(0.2)
    # duplicates of the same image: making the duplicate's teacher embedding identical to the
    # anchor's (a violation of size m if it were a negative) must not change the loss
    ids = torch.tensor([0, 0, 1, 2])
    t_v2, t_t2 = t_v.clone(), t_t.clone()
    t_v2[1], t_t2[1] = s_v[0], s_t[0]
    t_v2[0], t_t2[0] = s_v[0], s_t[0]
    with_dup = loss(s_v, s_t, t_v2, t_t2, ids).item()
    distinct = loss(s_v, s_t, t_v2, t_t2, torch.tensor([0, 3, 1, 2])).item()
    assert distinct > with_dup


# ---- affinity (relational) distillation ---------------------------------------------------------
def affinity_loop(s_v, s_t, t_v, t_t, ids, tau):
    """KL(teacher row distribution || student row distribution), rows over the other images' pairs."""
    def kl_rows(student, teacher):
        total = 0.0
        for i in range(student.shape[0]):
            cols = [j for j in range(student.shape[1]) if j == i or int(ids[j]) != int(ids[i])]
            p = torch.softmax(teacher[i, cols] / tau, 0)
            q = torch.softmax(student[i, cols] / tau, 0)
            total += float((p * (p.log() - q.log())).sum())
        return total / student.shape[0]
    return (kl_rows(s_v @ s_t.T, t_v @ t_t.T) + kl_rows(s_t @ s_v.T, t_t @ t_v.T)) / 2


def test_affinity_matches_loop_and_vanishes_for_the_teacher():
    s_v, s_t, t_v, t_t = batch(6, 5, seed=11)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    loss = AffinityDistillLoss(0.1)
    assert loss(s_v, s_t, t_v, t_t, ids).item() == pytest.approx(affinity_loop(s_v, s_t, t_v, t_t, ids, 0.1), rel=1e-9)
    assert loss(t_v, t_t, t_v, t_t, ids).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(s_v, s_t, t_v, t_t, ids).item() > 0.01
    # a student of another width: only the similarity structure is compared
    assert loss(unit(6, 3, seed=1), unit(6, 3, seed=2), t_v, t_t, ids).item() > 0


# ---- the task loss -----------------------------------------------------------------------------
def test_clip_loss_equals_open_clip():
    image, text = unit(8, 16, seed=1).float(), unit(8, 16, seed=2).float()
    logit_scale = torch.tensor(14.3)
    reference = open_clip.loss.ClipLoss()(image, text, logit_scale)
    assert ClipLoss()(image, text, logit_scale).item() == pytest.approx(reference.item(), rel=1e-6)
    distinct_ids = torch.arange(8)
    assert ClipLoss()(image, text, logit_scale, image_ids=distinct_ids).item() == pytest.approx(reference.item(), rel=1e-6)


def test_clip_loss_masks_other_captions_of_the_same_image():
    image, text = unit(4, 8, seed=3).float(), unit(4, 8, seed=4).float()
    ids = torch.tensor([0, 0, 1, 2])
    logits = 10 * image @ text.T
    logits[0, 1] = logits[1, 0] = float("-inf")
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert ClipLoss()(image, text, 10.0, image_ids=ids).item() == pytest.approx(expected.item(), rel=1e-6)
    assert gather_with_grad(image) is image  # not distributed: identity


# ---- DSMDLoss ----------------------------------------------------------------------------------
def dsmd_batch(dim=8, seed=0, requires_grad=True):
    s_v, s_t, t_v, t_t = [x.float() for x in batch(6, dim, seed=seed)]
    (_, _, _, _, ids), (m_v, m_t, m_v_ids, m_t_ids) = hn_inputs(seed)
    return {
        "projected_image": s_v.requires_grad_(requires_grad),
        "projected_text": s_t.requires_grad_(requires_grad),
        "teacher_image": t_v.requires_grad_(requires_grad),
        "teacher_text": t_t.requires_grad_(requires_grad),
        "image_ids": ids,
        "mined": {
            "i2i": Mined(unit(6, 3, dim, seed=seed + 30).float().requires_grad_(requires_grad), m_v_ids),
            "i2t": Mined(unit(6, 3, dim, seed=seed + 31).float().requires_grad_(requires_grad), m_t_ids),
        },
    }


def dsmd_loss_of(config: DistillConfig, dim: int) -> DSMDLoss:
    """The DSMD loss the training factory builds from `config` (plain arguments: the losses never see the config)."""
    from pipeline.common.params import TrainConfig
    from pipeline.training import loop
    dsmd, _, _ = loop.create_losses(TrainConfig(distill=config), teacher_dim=dim, total_steps=1)
    return dsmd


def test_margin_modes_agree_with_the_config():
    from pipeline.common.params import MarginMode
    from pipeline.training.losses import MARGIN_MODES
    assert set(MARGIN_MODES) == {m.value for m in MarginMode}


@pytest.mark.parametrize(
    "flags",
    [
        dict(),
        dict(contrastive=False, hard_negative=False),
        dict(feature=False, similarity=False, contrastive=False),
        dict(affinity=True, hard_negative=False),
    ],
)
def test_dsmd_loss_returns_exactly_the_enabled_terms(flags):
    config = DistillConfig(queue_size=8, temperature=0.1, margin=0.25, **flags)
    dsmd = dsmd_loss_of(config, dim=8)
    b = dsmd_batch()
    dsmd.prefill(unit(8, 8, seed=50).float(), unit(8, 8, seed=51).float(), torch.arange(8) + 100)
    losses = dsmd(**b)
    enabled = [name for name in DISTILL_NAMES if flags.get(name, getattr(DistillConfig(), name))]
    assert list(losses) == enabled == list(dsmd.names)
    assert (dsmd.queue is None) == (not config.contrastive)
    args = (b["projected_image"], b["projected_text"], b["teacher_image"], b["teacher_text"])
    reference = {
        "feature": lambda: FeatureDistillLoss()(*args),
        "similarity": lambda: SimilarityDistillLoss()(*args),
        "contrastive": lambda: ContrastiveDistillLoss(0.1)(*args, b["image_ids"], dsmd.queue),
        "hard_negative": lambda: HardNegativeDistillLoss(0.25, margin_mode="teacher")(
            *args, b["image_ids"], b["mined"]),
        "affinity": lambda: AffinityDistillLoss(0.05)(*args, b["image_ids"]),
    }
    for name, value in losses.items():
        assert value.item() == pytest.approx(reference[name]().item(), rel=1e-6), name


def test_dsmd_loss_all_off_is_an_error():
    off = dict(feature=False, similarity=False, contrastive=False, hard_negative=False)
    with pytest.raises(ValueError, match="switched off"):
        DSMDLoss([], dim=8)


def test_gradient_reaches_students_not_teachers():
    dsmd = dsmd_loss_of(DistillConfig(queue_size=8), dim=8)
    dsmd.prefill(unit(8, 8, seed=50).float(), unit(8, 8, seed=51).float(), torch.arange(8) + 100)
    b = dsmd_batch()
    losses = dsmd(**b)
    for name, value in losses.items():
        grads = torch.autograd.grad(
            value, [b["projected_image"], b["projected_text"]], allow_unused=True, retain_graph=True
        )
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    sum(losses.values()).backward()
    for key in ("teacher_image", "teacher_text"):
        assert b[key].grad is None, key
    assert all(mined.emb.grad is None for mined in b["mined"].values())
    assert not dsmd.queue.image.requires_grad


def test_dsmd_enqueue_is_explicit():
    dsmd = dsmd_loss_of(DistillConfig(queue_size=8), dim=8)
    b = dsmd_batch(requires_grad=False)
    dsmd(**b)
    assert int(dsmd.queue.num_valid) == 0  # forward never touches the queue
    dsmd.enqueue(b["teacher_image"], b["teacher_text"], b["image_ids"])
    assert int(dsmd.queue.num_valid) == 6
    assert dsmd.queue.owner_ids[:6].tolist() == b["image_ids"].tolist()
    assert torch.equal(dsmd.queue.image[:6], b["teacher_image"])


# ---- two ranks (gloo on the CPU) ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, result_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        image, text = unit(8, 6, seed=1).float(), unit(8, 6, seed=2).float()
        ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6])
        local = slice(rank * 4, rank * 4 + 4)
        local_image = image[local].clone().requires_grad_(True)
        # what the training step does: gather every rank's features (with gradient), then one loss
        loss = ClipLoss()(gather_with_grad(local_image), gather_with_grad(text[local]), 5.0,
                          image_ids=gather_no_grad(ids[local]))
        loss.backward()
        dsmd = dsmd_loss_of(DistillConfig(queue_size=16, hard_negative=False), dim=6)
        n = 3 if rank == 0 else 2  # unequal last batches
        dsmd.enqueue(gather_no_grad(unit(n, 6, seed=10 + rank).float()), gather_no_grad(unit(n, 6, seed=20 + rank).float()),
                     gather_no_grad(torch.arange(n) + 10 * rank))
        torch.save(
            {"loss": loss.detach(), "grad": local_image.grad, "owner_ids": dsmd.queue.owner_ids,
             "queue_image": dsmd.queue.image},
            os.path.join(result_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_the_global_batch(tmp_path):
    mp.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    image, text = unit(8, 6, seed=1).float(), unit(8, 6, seed=2).float()
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6])
    full_image = image.clone().requires_grad_(True)
    reference = ClipLoss()(full_image, text, 5.0, image_ids=ids)
    reference.backward()
    for rank, result in enumerate(results):
        assert result["loss"].item() == pytest.approx(reference.item(), rel=1e-5)
        # every rank computes the global loss; all_gather's backward sums the ranks' gradients, so
        # each shard gets world_size x dL/dx (DDP's averaging then gives dL/dtheta)
        torch.testing.assert_close(result["grad"], 2 * full_image.grad[rank * 4: rank * 4 + 4], rtol=1e-4, atol=1e-6)
    # both ranks hold the same queue: rank 0's 3 rows, then rank 1's 2
    assert results[0]["owner_ids"].tolist()[:6] == [0, 1, 2, 10, 11, -1]
    assert torch.equal(results[0]["owner_ids"], results[1]["owner_ids"])
    assert torch.equal(results[0]["queue_image"], results[1]["queue_image"])
