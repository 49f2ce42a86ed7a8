"""The DSMD losses (four scales of the same output embeddings), the teacher queue and the CLIP loss.

Notation: s_v, s_t are the student's image and text embeddings (already projected to the teacher's
width D), t_v, t_t the teacher's cached ones; all L2-normalised (B, D) tensors. `image_ids` (B,) int64
names each sample's image so that pairs of the same image (one sample per caption puts an image
several times in a batch or in the queue) are never treated as negatives. Teacher inputs are
constants: they are detached here, so gradient reaches the student only.

Style follows open_clip's `loss.py`: each loss is a small nn.Module whose docstring gives its formula.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pipeline.common import runtime

LOSS_NAMES = ("feature", "similarity", "contrastive", "hard_negative", "affinity", "task")
DISTILL_NAMES = LOSS_NAMES[:-1]  # DSMDLoss's terms; "task" is ClipLoss
MARGIN_MODES = ("teacher", "fixed")  # pipeline.config.MarginMode's values (tests/test_losses.py keeps them equal)

# owner id of an empty queue entry / a padded mined negative
INVALID_ID = -1


def _teacher(teacher: Tensor, like: Tensor) -> Tensor:
    """Teacher embeddings as constants in the student's dtype (the cache may hold float16)."""
    return teacher.detach().to(device=like.device, dtype=like.dtype)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0, keeping autograd (torch.distributed.nn.all_gather,
    as open_clip's `gather_features(gather_with_grad=True)`); the identity when not distributed.

    Every rank must pass the same shape. The backward sums the gradients the ranks computed for this
    rank's shard, so when every rank computes the same global loss the local gradient is
    world_size x dL/dx, which DDP's gradient averaging turns back into dL/dtheta.
    """
    if runtime.world_size() <= 1:
        return x
    import torch.distributed.nn  # noqa: F401  (registers torch.distributed.nn.all_gather)

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0 without autograd; ranks may pass different
    lengths along dim 0 (rows are padded to the longest for the collective, then stripped)."""
    world_size = runtime.world_size()
    if world_size <= 1:
        return x
    x = x.detach().contiguous()
    length = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    longest = max(lengths)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, lengths)], dim=0)


class FeatureDistillLoss(nn.Module):
    """Element-level distillation (L1 over all B x D elements):

        L_feat = mean_{i,d} |s_v[i,d] - t_v[i,d]| + mean_{i,d} |s_t[i,d] - t_t[i,d]|
    """

    def forward(self, projected_image: Tensor, projected_text: Tensor, teacher_image: Tensor, teacher_text: Tensor) -> Tensor:
        image_term = (projected_image - _teacher(teacher_image, projected_image)).abs().mean()
        text_term = (projected_text - _teacher(teacher_text, projected_text)).abs().mean()
        return image_term + text_term


class SimilarityDistillLoss(nn.Module):
    """Sample-direction distillation (0 when every student embedding points like its teacher's, 1 when opposite):

        L_sim = [1 - (1 + mean_i cos(s_v_i, t_v_i)) / 2] + [1 - (1 + mean_i cos(s_t_i, t_t_i)) / 2]
    """

    def forward(self, projected_image: Tensor, projected_text: Tensor, teacher_image: Tensor, teacher_text: Tensor) -> Tensor:
        image_cos = F.cosine_similarity(projected_image, _teacher(teacher_image, projected_image), dim=-1).mean()
        text_cos = F.cosine_similarity(projected_text, _teacher(teacher_text, projected_text), dim=-1).mean()
        return (1 - (1 + image_cos) / 2) + (1 - (1 + text_cos) / 2)


class TeacherQueue(nn.Module):
    """FIFO of the K most recent teacher embeddings (image and text) with the image id owning each.

    All state is in registered buffers (`image`, `text` (K, D) float32; `owner_ids` (K,) int64 with
    -1 = empty; `ptr`, the next slot to write, which once full is the oldest entry; `num_valid`), so
    `state_dict()` / `load_state_dict()` resume it exactly and `.to(device)` moves it.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"TeacherQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("owner_ids", torch.full((size,), INVALID_ID, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_valid", torch.zeros((), dtype=torch.long))

    def _check(self, teacher_image: Tensor, teacher_text: Tensor, image_ids: Tensor) -> None:
        rows = image_ids.shape[0]
        if teacher_image.shape != (rows, self.dim) or teacher_text.shape != (rows, self.dim):
            raise ValueError(
                f"TeacherQueue(dim={self.dim}): expected ({rows}, {self.dim}) teacher embeddings, got "
                f"image {tuple(teacher_image.shape)} and text {tuple(teacher_text.shape)}"
            )

    @torch.no_grad()
    def enqueue(self, teacher_image: Tensor, teacher_text: Tensor, image_ids: Tensor) -> None:
        """Append rows in order, overwriting the oldest entries; rows with image id -1 are skipped.
        More than K rows: only the last K remain (as if enqueued one by one)."""
        self._check(teacher_image, teacher_text, image_ids)
        keep = image_ids != INVALID_ID
        teacher_image, teacher_text, image_ids = teacher_image[keep], teacher_text[keep], image_ids[keep]
        rows = image_ids.shape[0]
        if rows == 0:
            return
        if rows > self.size:
            # the earlier rows would be overwritten within this call anyway; the write
            # position advances as if all of them had been written
            start = (int(self.ptr) + rows - self.size) % self.size
            teacher_image, teacher_text, image_ids = (
                teacher_image[-self.size:], teacher_text[-self.size:], image_ids[-self.size:]
            )
            self.ptr.fill_(start)
            rows = self.size
        slots = (int(self.ptr) + torch.arange(rows, device=self.owner_ids.device)) % self.size
        self.image[slots] = teacher_image.detach().to(self.image)
        self.text[slots] = teacher_text.detach().to(self.text)
        self.owner_ids[slots] = image_ids.to(self.owner_ids)
        self.ptr.fill_((int(self.ptr) + rows) % self.size)
        self.num_valid.fill_(min(self.size, int(self.num_valid) + rows))

    @torch.no_grad()
    def prefill(self, teacher_image: Tensor, teacher_text: Tensor, image_ids: Tensor) -> None:
        """Empty the queue, then enqueue these rows (typically a random sample of the cached teacher
        embeddings, so the first steps already see real negatives rather than random vectors)."""
        self._check(teacher_image, teacher_text, image_ids)
        self.image.zero_()
        self.text.zero_()
        self.owner_ids.fill_(INVALID_ID)
        self.ptr.zero_()
        self.num_valid.zero_()
        self.enqueue(teacher_image, teacher_text, image_ids)


class ContrastiveDistillLoss(nn.Module):
    """Global-structure distillation: InfoNCE of each student embedding against its teacher
    embedding (positive) and the queue of teacher embeddings (negatives), per modality:

        logits_i = [s_i . t_i, s_i . Q_1, ..., s_i . Q_K] / tau,   L = mean_i CE(logits_i, 0)
        L_con = L(s_v, t_v, Q_v) + L(s_t, t_t, Q_t)

    Queue entries owned by the sample's own image, and empty entries, get logit -inf (they take no
    part in the softmax). With an empty queue the loss is 0.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def _modality(self, student: Tensor, teacher: Tensor, queue_emb: Tensor, negative_mask: Tensor) -> Tensor:
        positive = (student * teacher).sum(dim=-1, keepdim=True)
        negatives = (student @ queue_emb.to(student.dtype).T).masked_fill(negative_mask, float("-inf"))
        logits = torch.cat([positive, negatives], dim=1) / self.temperature
        targets = torch.zeros(student.shape[0], dtype=torch.long, device=student.device)
        return F.cross_entropy(logits, targets)

    def forward(
        self,
        projected_image: Tensor,
        projected_text: Tensor,
        teacher_image: Tensor,
        teacher_text: Tensor,
        image_ids: Tensor,
        queue: TeacherQueue,
    ) -> Tensor:
        owner_ids = queue.owner_ids.to(image_ids.device)
        # (B, K): same image as the sample, or an empty slot
        negative_mask = (owner_ids[None, :] == image_ids[:, None]) | (owner_ids[None, :] == INVALID_ID)
        image_term = self._modality(projected_image, _teacher(teacher_image, projected_image), queue.image, negative_mask)
        text_term = self._modality(projected_text, _teacher(teacher_text, projected_text), queue.text, negative_mask)
        return image_term + text_term


class Mined(NamedTuple):
    """One direction's mined teacher negatives of a batch (`dsmd mine`): `emb` (B, H, D) the teacher's embeddings of
    each sample's H hardest negatives, `owner` (B, H) the image each belongs to (INVALID_ID: padding)."""

    emb: Tensor
    owner: Tensor


# which mined lists each anchor takes, by the direction they were mined in (image anchors: i2i, i2t; text: t2t, t2i)
MINED_DIRECTIONS = ("i2i", "i2t", "t2t", "t2i")


class HardNegativeDistillLoss(nn.Module):
    """Local-ranking distillation: VSE++ max-violation triplet loss between student anchors a and
    teacher embeddings b, with S = a b^T:

        T(a, b) = reduce_i ( max_j [m_ij + S_ij - S_ii]_+  +  max_j [m_ji + S_ji - S_ii]_+ )
        L_hn    = T(s_v, t_v) + T(s_t, t_t) + T(s_v, t_t) + T(s_t, t_v)

    Margins (`margin_mode`):
    - `fixed`: m_ij = m (the paper; 0.2). A teacher that itself ranks some negatives above the
      positive makes even a student equal to the teacher pay this loss forever.
    - `teacher`: the teacher's own gap, m_ij = G_ii - G_ij with G = a^T b the same scores computed with
      the teacher's embedding of the anchor, and only pairs the teacher ranks correctly (m_ij > 0)
      count: the student must separate each negative at least as far as the teacher does, and a
      student equal to the teacher pays exactly 0.

    Row direction (anchor a_i against teacher negatives): j runs over the other in-batch b_j plus the
    sample's mined teacher negatives, found from the anchor's side (image anchors: i2i and i2t lists;
    text anchors: t2i and t2t). Column direction (teacher b_i against student negatives a_j): in-batch
    only. Negatives whose owner image id equals the anchor's image id, and mined padding (id -1), are
    ignored; an anchor without any negative contributes 0.

    `reduction="mean"` (default) averages over the batch; `"sum"` is the authors' (and VSE++'s)
    choice, which makes the loss -- and so any fixed weight on it -- grow with the batch size.
    """

    def __init__(self, margin: float = 0.2, reduction: str = "mean", margin_mode: str = "fixed"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if margin_mode not in MARGIN_MODES:
            raise ValueError(f"margin_mode must be one of {MARGIN_MODES}, got {margin_mode!r}")
        self.margin = margin
        self.reduction = reduction
        self.margin_mode = margin_mode

    def _cost(self, scores: Tensor, positive: Tensor, teacher_scores: Optional[Tensor], teacher_positive: Optional[Tensor]) -> Tensor:
        """[m + S_neg - S_pos]_+ elementwise, with m fixed or the teacher's gap (pairs it misorders: 0)."""
        if teacher_scores is None:
            return (self.margin + scores - positive).clamp(min=0)
        gap = teacher_positive - teacher_scores
        return (gap + scores - positive).clamp(min=0).masked_fill(gap <= 0, 0)

    def triplet(
        self,
        anchor: Tensor,
        positive: Tensor,
        image_ids: Tensor,
        mined: Optional[Mined] = None,
        teacher_anchor: Optional[Tensor] = None,
    ) -> Tensor:
        """T(anchor, positive) for one pair of modalities, with the anchors' `mined` teacher negatives;
        `teacher_anchor` (B, D), the teacher's embedding of each anchor, for margin_mode teacher."""
        if self.margin_mode == "teacher" and teacher_anchor is None:
            raise ValueError("margin_mode 'teacher' needs the teacher's embedding of the anchors")
        teacher_anchor = None if self.margin_mode == "fixed" else _teacher(teacher_anchor, anchor)
        scores = anchor @ positive.T  # S_ij = a_i . b_j
        positive_scores = scores.diagonal()
        teacher = teacher_positive = None
        if teacher_anchor is not None:
            teacher = teacher_anchor @ positive.T  # G_ij, the teacher's own S
            teacher_positive = teacher.diagonal()
        same_image = image_ids[:, None] == image_ids[None, :]  # includes the diagonal
        # row i: anchor a_i against teacher negatives b_j
        row_cost = self._cost(scores, positive_scores[:, None], teacher, None if teacher is None else teacher_positive[:, None])
        row_hardest = row_cost.masked_fill(same_image, 0).max(dim=1).values
        if mined is not None and mined.emb.shape[1] > 0:
            negatives = _teacher(mined.emb, anchor)
            mined_scores = torch.einsum("bd,bhd->bh", anchor, negatives)
            mined_teacher = None if teacher_anchor is None else torch.einsum("bd,bhd->bh", teacher_anchor, negatives)
            ignore = (mined.owner == INVALID_ID) | (mined.owner == image_ids[:, None])
            mined_cost = self._cost(mined_scores, positive_scores[:, None], mined_teacher,
                                    None if teacher is None else teacher_positive[:, None])
            row_hardest = torch.maximum(row_hardest, mined_cost.masked_fill(ignore, 0).max(dim=1).values)
        # column i: teacher b_i against student negatives a_j (scores S_ji, the teacher's G_ji)
        column_cost = self._cost(scores, positive_scores[None, :], teacher, None if teacher is None else teacher_positive[None, :])
        column_hardest = column_cost.masked_fill(same_image, 0).max(dim=0).values
        per_sample = row_hardest + column_hardest
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()

    def forward(
        self,
        projected_image: Tensor,
        projected_text: Tensor,
        teacher_image: Tensor,
        teacher_text: Tensor,
        image_ids: Tensor,
        mined: Optional[Mapping[str, Mined]] = None,
    ) -> Tensor:
        """`mined`: direction (MINED_DIRECTIONS) -> the batch's mined negatives; image anchors take the i2i and
        i2t lists, text anchors t2t and t2i; a direction left out means in-batch negatives only."""
        mined = mined or {}
        t_v = _teacher(teacher_image, projected_image)
        t_t = _teacher(teacher_text, projected_text)
        return (
            self.triplet(projected_image, t_v, image_ids, mined.get("i2i"), teacher_anchor=t_v)
            + self.triplet(projected_text, t_t, image_ids, mined.get("t2t"), teacher_anchor=t_t)
            + self.triplet(projected_image, t_t, image_ids, mined.get("i2t"), teacher_anchor=t_v)
            + self.triplet(projected_text, t_v, image_ids, mined.get("t2i"), teacher_anchor=t_t)
        )


class AffinityDistillLoss(nn.Module):
    """Cross-modal relational distillation (TinyCLIP's affinity mimicking, CLIP-KD's CRD): the
    student's in-batch image-to-text and text-to-image distributions match the teacher's,

        P = softmax(t_v t_t^T / tau) row-wise,  Q = log_softmax(s_v s_t^T / tau) row-wise
        L_aff = [mean_i KL(P_i || Q_i) + mean_j KL(P^T_j || Q^T_j)] / 2

    Off-diagonal pairs of the same image are left out of both distributions (not negatives). It
    transfers how the teacher ranks every caption of the batch for every image, which is what
    retrieval measures; a student equal to the teacher pays 0.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"affinity temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, projected_image: Tensor, projected_text: Tensor, teacher_image: Tensor, teacher_text: Tensor,
                image_ids: Tensor) -> Tensor:
        same_image = image_ids[:, None] == image_ids[None, :]
        same_image.fill_diagonal_(False)
        student = (projected_image @ projected_text.T / self.temperature).masked_fill(same_image, float("-inf"))
        t_v, t_t = _teacher(teacher_image, projected_image), _teacher(teacher_text, projected_text)
        teacher = (t_v @ t_t.T / self.temperature).masked_fill(same_image, float("-inf"))
        keep = ~same_image  # masked entries would give 0 * (-inf - -inf) = nan: summed as 0 instead
        return (self._masked_kl(student, teacher, keep) + self._masked_kl(student.T, teacher.T, keep.T)) / 2

    @staticmethod
    def _masked_kl(student_logits: Tensor, teacher_logits: Tensor, keep: Tensor) -> Tensor:
        log_q = F.log_softmax(student_logits, dim=1)
        log_p = F.log_softmax(teacher_logits, dim=1)
        terms = torch.where(keep, log_p.exp() * (log_p - log_q), torch.zeros_like(log_q))
        return terms.sum(dim=1).mean()


class ClipLoss(nn.Module):
    """The task loss: symmetric cross-entropy over the student's own image-text similarities,

        logits = logit_scale * s_v s_t^T,   L_task = (CE(logits, diag) + CE(logits^T, diag)) / 2

    Called with the global batch: under torch.distributed the training step gathers every rank's
    features with gradient first (`gather_with_grad`, open_clip's `gather_features(gather_with_grad=True)`).
    Optional `image_ids` mask the off-diagonal pairs of the same image (logit -inf), which are not
    negatives; without them (or with distinct ids) this equals open_clip's ClipLoss.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                image_ids: Optional[Tensor] = None) -> Tensor:
        logits_per_image = logit_scale * image_features @ text_features.T
        if image_ids is not None:
            same_image = image_ids[:, None] == image_ids[None, :]
            same_image.fill_diagonal_(False)
            logits_per_image = logits_per_image.masked_fill(same_image, float("-inf"))
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


class DSMDLoss(nn.Module):
    """The enabled distillation terms and the teacher queue (built from the config by `training.create_losses`).

    Called with the model's output and the batch's targets, as open_clip's losses are
    (`dsmd_loss(**features, **targets)`), over the global batch; returns the raw, unweighted terms as
    `{name: loss}` in `LOSS_NAMES` order (the balancer weighs them). The task term is not here: it is
    `ClipLoss` on the student's own embeddings, for the DSMD and the CLIP-only student alike.

    Names (the model's output, `pipeline.data`'s batch keys): projected_image, projected_text (the
    student's embeddings projected to the teacher's width), teacher_image, teacher_text, image_ids, and
    optionally image, text (the student's own embeddings, for the affinity term) and `mined` (direction -> Mined).
    The queue changes only through `enqueue()`, which the caller runs once per optimizer step after
    `optimizer.step()` with the global batch (identical on every rank, so every rank holds the same queue).
    """

    def __init__(self, terms: Sequence[str], dim: int, temperature: float = 0.05, queue_size: int = 8192,
                 margin: float = 0.2, margin_mode: str = "teacher", affinity_temperature: float = 0.05):
        """`terms`: the enabled distillation terms (names of DISTILL_NAMES); `dim`: the teacher's width."""
        super().__init__()
        unknown = [t for t in terms if t not in DISTILL_NAMES]
        if unknown:
            raise ValueError(f"unknown distillation terms {unknown}; known: {DISTILL_NAMES}")
        self.enabled = tuple(name for name in DISTILL_NAMES if name in terms)
        if not self.enabled:
            raise ValueError(f"every distillation term is switched off; enable at least one of {DISTILL_NAMES}")
        on = set(self.enabled)
        self.feature = FeatureDistillLoss() if "feature" in on else None
        self.similarity = SimilarityDistillLoss() if "similarity" in on else None
        self.contrastive = ContrastiveDistillLoss(temperature) if "contrastive" in on else None
        self.queue = TeacherQueue(queue_size, dim) if "contrastive" in on else None
        self.hard_negative = HardNegativeDistillLoss(margin, margin_mode=margin_mode) if "hard_negative" in on else None
        self.affinity = AffinityDistillLoss(affinity_temperature) if "affinity" in on else None

    @property
    def names(self) -> tuple[str, ...]:
        """The enabled terms, in LOSS_NAMES order."""
        return self.enabled

    def forward(
        self, projected_image: Tensor, projected_text: Tensor, teacher_image: Tensor, teacher_text: Tensor,
        image_ids: Tensor, image: Optional[Tensor] = None, text: Optional[Tensor] = None,
        mined: Optional[Mapping[str, Mined]] = None,
    ) -> dict[str, Tensor]:
        return self._terms(projected_image, projected_text, teacher_image, teacher_text, image_ids, image, text, mined,
                           self.queue, self.contrastive)

    def _terms(self, s_v: Tensor, s_t: Tensor, t_v: Tensor, t_t: Tensor, image_ids: Tensor, image: Optional[Tensor],
               text: Optional[Tensor], mined: Optional[Mapping[str, Mined]], queue, contrastive) -> dict[str, Tensor]:
        """The enabled terms of one (student, teacher) pair of embeddings, with this queue and contrastive loss."""
        losses: dict[str, Tensor] = {}
        if self.feature is not None:
            losses["feature"] = self.feature(s_v, s_t, t_v, t_t)
        if self.similarity is not None:
            losses["similarity"] = self.similarity(s_v, s_t, t_v, t_t)
        if self.contrastive is not None:
            losses["contrastive"] = contrastive(s_v, s_t, t_v, t_t, image_ids, queue)
        if self.hard_negative is not None:
            losses["hard_negative"] = self.hard_negative(s_v, s_t, t_v, t_t, image_ids, mined)
        if self.affinity is not None:  # on the student's own space (what retrieval uses) when given
            losses["affinity"] = self.affinity(s_v if image is None else image, s_t if text is None else text, t_v, t_t, image_ids)
        return losses

    @torch.no_grad()
    def enqueue(self, teacher_image: Tensor, teacher_text: Tensor, image_ids: Tensor) -> None:
        """Push a step's teacher embeddings (the global batch); no-op without the queue."""
        if self.queue is not None:
            self.queue.enqueue(teacher_image, teacher_text, image_ids)

    @torch.no_grad()
    def prefill(self, teacher_image: Tensor, teacher_text: Tensor, image_ids: Tensor) -> None:
        """Fill the queue from the cache before training (pass the same rows on every rank)."""
        if self.queue is not None:
            self.queue.prefill(teacher_image, teacher_text, image_ids)


class _QueueSlice(NamedTuple):
    """One teacher's columns of the joint TeacherQueue, as ContrastiveDistillLoss reads a queue."""

    image: Tensor
    text: Tensor
    owner_ids: Tensor


class PerTeacherDSMDLoss(DSMDLoss):
    """The DSMD terms against each of several teachers apart (`train.teachers_target: each`), the terms summed over
    the teachers by share: `L_term = sum_k w_k L_term(s^k, t^k)`.

    The teachers' unit embeddings come side by side (widths d_1, ..., d_n; the teacher queue and the mined rows
    alike); teacher k's student embedding s^k is normalize((W f)[d_k's columns]), i.e. its own rows of the one
    projection W with its own normalisation, and its contrastive temperature is `temperature * temperatures[k]`
    (MobileCLIP2's per-teacher logit scale). The affinity term, on the student's own space when given, is summed
    the same way. Called, queued and checkpointed as DSMDLoss (one joint queue)."""

    def __init__(self, terms: Sequence[str], widths: Sequence[int], shares: Sequence[float],
                 temperatures: Sequence[float], temperature: float = 0.05, queue_size: int = 8192,
                 margin: float = 0.2, margin_mode: str = "teacher", affinity_temperature: float = 0.05):
        super().__init__(terms, sum(widths), temperature, queue_size, margin, margin_mode, affinity_temperature)
        if not (len(widths) == len(shares) == len(temperatures)) or min(shares) <= 0 or min(temperatures) <= 0:
            raise ValueError(f"one positive share and temperature per teacher width: {widths}, {shares}, {temperatures}")
        ends = [int(e) for e in torch.tensor(list(widths)).cumsum(0)]
        self.bounds = list(zip([0, *ends[:-1]], ends))
        self.shares = [float(s) / float(sum(shares)) for s in shares]
        self.contrastives = nn.ModuleList(ContrastiveDistillLoss(temperature * t) for t in temperatures) \
            if self.contrastive is not None else None

    def forward(
        self, projected_image: Tensor, projected_text: Tensor, teacher_image: Tensor, teacher_text: Tensor,
        image_ids: Tensor, image: Optional[Tensor] = None, text: Optional[Tensor] = None,
        mined: Optional[Mapping[str, Mined]] = None,
    ) -> dict[str, Tensor]:
        total: dict[str, Tensor] = {}
        for index, ((a, b), share) in enumerate(zip(self.bounds, self.shares)):
            s_v, s_t = F.normalize(projected_image[:, a:b], dim=-1), F.normalize(projected_text[:, a:b], dim=-1)
            queue = None if self.queue is None else _QueueSlice(self.queue.image[:, a:b], self.queue.text[:, a:b],
                                                               self.queue.owner_ids)
            sliced = {d: Mined(m.emb[..., a:b], m.owner) for d, m in mined.items()} if mined else mined
            losses = self._terms(s_v, s_t, teacher_image[:, a:b], teacher_text[:, a:b], image_ids, image, text, sliced,
                                 queue, self.contrastives[index] if self.contrastives is not None else None)
            for name, value in losses.items():
                total[name] = total[name] + share * value if name in total else share * value
        return {name: total[name] for name in self.enabled}
