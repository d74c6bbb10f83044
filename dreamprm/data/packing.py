"""Prefix packing: every step prefix of a chain scored in one sequence, exactly as one by one.

Per-prefix scoring runs one sequence per prefix j, ``s_j = H · B_j · X``: H the chat template, the
image and the question; B_j the steps up to j; X the scoring suffix the chat template appends
(``<|im_end|>\\n<|im_start|>assistant\\n``), scored at its last token. A packed row holds the
longest sequence once (the *spine*) and, after it, for every other sequence only the tokens where
that sequence departs from the spine (its *branch*):

    spine      H · B_1 · B_2 · ... · B_n · X       sequence n is scored at the spine's last token
    branch j   X                                  (B_j's tokens a prefix of the spine's)

Token q attends to spine tokens ``k < visible[q]`` and to tokens ``branch_start[q] <= k <= q``. A
spine token sees the spine causally (``visible = q + 1``, ``branch_start = q``); a token of branch j
sees the spine up to where sequence j departs from it (``visible = cut_j``) and its own branch up to
itself. Its positions (Qwen2-VL's 3-D multimodal rotary positions included) are the ones it has in
s_j. So every token of s_j meets exactly the keys, at exactly the positions, of the per-prefix
forward, and the scores, losses and gradients equal the per-prefix ones up to rounding.

Nothing is assumed about the tokenizer: ``cut_j`` is the longest common token prefix of s_j and the
spine. When a BPE merge across a step boundary (Qwen2's pre-tokenizer keeps ``".\\n"`` together)
makes B_j's tokens differ from the start of B_{j+1}'s, branch j simply starts earlier and carries
those tokens too. Only the saving depends on how much the sequences share.

The attention mask itself is built on the device by `dreamprm.model.prm.packed_attention_mask`
from ``visible`` and ``branch_start`` (two integers per token instead of a [L, L] matrix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dreamprm.data.chat import ChainLayout
from dreamprm.data.datasets import PRMCollator, item_tensors, select_images
from dreamprm.model.adapters import ADAPTERS
from dreamprm.model.adapters import mrope_positions as rope_positions  # noqa: F401  (tests import it from here)

PACKING_MODES = ("none", "chain")


@dataclass(frozen=True)
class PackedLayout:
    """One packed row: which tokens of which sequence sit where, and what each token may see."""
    segments: list[tuple[int, int, int]]  # (sequence, start, end): the row is these slices back to back
    visible: list[int]  # spine tokens k < visible[q] are visible to token q
    branch_start: list[int]  # and tokens branch_start[q] <= k <= q
    score_index: list[int]  # where each sequence's last token sits, in the order given

    @property
    def source(self) -> list[tuple[int, int]]:
        """(sequence, index in that sequence) of every packed token."""
        return [(s, i) for s, a, b in self.segments for i in range(a, b)]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack_sequences(sequences: Sequence[Sequence[int]]) -> PackedLayout:
    """Lay out token sequences that share a start as one spine plus branches.

    The spine is the longest sequence (the last of equally long ones); every other sequence keeps
    only its tokens after its common prefix with the spine.

    >>> layout = pack_sequences([[1, 2, 3, 9], [1, 2, 3, 4, 5, 9]])
    >>> layout.source   # spine: sequence 1 whole; branch: sequence 0's last token
    [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (0, 3)]
    >>> layout.visible, layout.branch_start
    ([1, 2, 3, 4, 5, 6, 3], [0, 1, 2, 3, 4, 5, 6])
    >>> layout.score_index
    [6, 5]
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_sequences: every sequence needs at least one token")
    spine_id = max(range(len(sequences)), key=lambda j: (len(sequences[j]), j))
    spine = sequences[spine_id]
    segments = [(spine_id, 0, len(spine))]
    visible = list(range(1, len(spine) + 1))
    branch_start = list(range(len(spine)))
    score_index = [0] * len(sequences)
    score_index[spine_id] = len(spine) - 1
    for j, seq in enumerate(sequences):
        if j == spine_id:
            continue
        cut = common_prefix_length(seq, spine)
        if cut == len(seq):  # the whole sequence lies on the spine: score it there
            score_index[j] = cut - 1
            continue
        start = len(visible)
        segments.append((j, cut, len(seq)))
        visible += [cut] * (len(seq) - cut)
        branch_start += [start] * (len(seq) - cut)
        score_index[j] = len(visible) - 1
    return PackedLayout(segments, visible, branch_start, score_index)


def group_chain_records(records: Sequence[Any]) -> list[int | None]:
    """A chain group id per training record (None: scored alone), for records that nest.

    Records nest when they share ``chain_id``, image, question and domain, and each one's text is a
    prefix of the next one's (by ``step_index``, then length): ``input + "\\n\\n" + add`` with each
    ``add`` a prefix of the next. A run that stops nesting starts a new group; a group of one record
    gets None. Works on `TrainRecord`s (``question`` is compared when the records carry it).

    >>> from types import SimpleNamespace as R
    >>> rs = [R(chain_id="a", image_path="x", domain="d", step_index=i, text="Q\\n\\nStep 1" + t)
    ...       for i, t in ((2, "\\nStep 2"), (1, ""))] + [R(chain_id=None, image_path="x", domain="d",
    ...       step_index=None, text="Q")]
    >>> group_chain_records(rs)
    [0, 0, None]
    """
    by_chain: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        if r.chain_id is not None:
            key = (r.chain_id, str(r.image_path), getattr(r, "question", None), r.domain)
            by_chain.setdefault(key, []).append(i)
    groups: list[int | None] = [None] * len(records)
    next_id = 0
    for members in by_chain.values():
        members.sort(key=lambda i: (records[i].step_index if records[i].step_index is not None else -1,
                                    len(records[i].text)))
        runs: list[list[int]] = []
        for i in members:
            if runs and records[i].text.startswith(records[runs[-1][-1]].text):
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            if len(run) > 1:
                for i in run:
                    groups[i] = next_id
                next_id += 1
    return groups


def chain_units(groups: Sequence[int | None]) -> list[list[int]]:
    """Record indices as sampling units: each chain group's records together (in index order), every
    ungrouped record alone; units in order of their first record."""
    units: list[list[int]] = []
    where: dict[int, int] = {}
    for i, g in enumerate(groups):
        if g is None:
            units.append([i])
        elif g in where:
            units[where[g]].append(i)
        else:
            where[g] = len(units)
            units.append([i])
    return units


def row_members(items: list[dict[str, Any]]) -> list[list[int]]:
    """Which items share a packed row: the training records of one chain group (wherever they sit in
    the batch), every other item alone; rows in order of their first item."""
    rows: list[list[int]] = []
    row_of_group: dict[Any, int] = {}
    for i, item in enumerate(items):
        group = item.get("group")
        if group is not None and group in row_of_group:
            rows[row_of_group[group]].append(i)
            continue
        if group is not None:
            row_of_group[group] = len(rows)
        rows.append([i])
    return rows


@dataclass
class PackedPRMCollator(PRMCollator):
    """`PRMCollator`'s batch with each item's texts packed into one row (see the module docstring).

    Items as for `PRMCollator`: a meta chain or Best-of-N candidate (several texts, one target) is one
    row; the training records of one chain group in the batch (``group``, see `group_chain_records`)
    share one row. Everything but the model inputs is exactly `PRMCollator`'s, in its order: one
    ``score_index`` / ``item_index`` entry per text, ``domain``, ``target`` and ``record`` per item. Added:
    ``score_row`` [scores] (the row a score is read from), ``position_ids`` [rows, 3, length] and
    ``packed_visible`` / ``packed_branch_start`` [rows, length]. Each row's image is processed once.
    """

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        processor, tokenizer, adapter = self.processor, self.processor.tokenizer, self.adapter
        image_token = adapter.image_placeholder(processor)
        members = row_members(items)
        # Records of one group share their image file; the row's first item's image stands for all.
        vision = adapter.vision_inputs(processor, [items[m[0]]["image"] for m in members])
        rows, where = [], {}  # where[(item, text)] = (row, score position)
        for r, member in enumerate(members):
            keys = [(i, j) for i in member for j in range(len(items[i]["texts"]))]
            texts = [self.chat_text(items[i]["texts"][j]) for i, j in keys]
            for (i, j), text in zip(keys, texts):
                if text.count(image_token) != 1:
                    raise ValueError(f"packing: item {i}, text {j} ({items[i]['texts'][j][:40]!r}...): the chat text "
                                     f"needs exactly one {image_token}, found {text.count(image_token)}")
            # The processor's own expansion of the image placeholder.
            expanded = [adapter.expand_image(processor, t, vision, r) for t in texts]
            sequences = tokenizer(expanded)["input_ids"]
            types = adapter.token_types(processor, sequences)
            layout = pack_sequences(sequences)
            rows.append({
                "input_ids": [t for s, a, b in layout.segments for t in sequences[s][a:b]],
                "mm_token_type_ids": [t for s, a, b in layout.segments for t in types[s][a:b]],
                # A token's positions depend on the tokens before it in its own sequence only.
                "position_ids": torch.cat([adapter.positions(processor, types[s][:b], vision, r)[:, a:]
                                           for s, a, b in layout.segments], dim=1),
                "visible": layout.visible, "branch_start": layout.branch_start,
            })
            where.update({key: (r, q) for key, q in zip(keys, layout.score_index)})
        order = [where[(i, j)] for i, item in enumerate(items) for j in range(len(item["texts"]))]
        batch = self._pad(rows, tokenizer.pad_token_id, adapter.rotary_axes)
        batch.update({k: v for k, v in vision.items() if k == "pixel_values" or k in adapter.image_keys()})
        batch["image_rows"] = adapter.image_rows(vision)
        batch["score_row"] = torch.tensor([r for r, _ in order], dtype=torch.long)
        batch["score_index"] = torch.tensor([q for _, q in order], dtype=torch.long)
        batch["item_index"] = torch.tensor([i for i, item in enumerate(items) for _ in item["texts"]], dtype=torch.long)
        batch.update(item_tensors(items))
        return batch

    @staticmethod
    def _pad(rows: list[dict[str, Any]], pad_id: int, rotary_axes: int = 3) -> dict[str, torch.Tensor]:
        """Right padding. A padding token sees only itself: a fully masked query row would make
        SDPA return NaN, and a NaN there reaches the weight gradients as 0 * NaN."""
        length = max(len(r["input_ids"]) for r in rows)
        n = len(rows)
        out = {"input_ids": torch.full((n, length), pad_id, dtype=torch.long),
               "attention_mask": torch.zeros(n, length, dtype=torch.long),
               "mm_token_type_ids": torch.zeros(n, length, dtype=torch.long),
               "position_ids": torch.zeros(n, rotary_axes, length, dtype=torch.long),
               "packed_visible": torch.zeros(n, length, dtype=torch.long),
               "packed_branch_start": torch.arange(length).repeat(n, 1)}
        for i, r in enumerate(rows):
            m = len(r["input_ids"])
            out["input_ids"][i, :m] = torch.tensor(r["input_ids"])
            out["attention_mask"][i, :m] = 1
            out["mm_token_type_ids"][i, :m] = torch.tensor(r["mm_token_type_ids"])
            out["position_ids"][i, :, :m] = r["position_ids"]
            out["packed_visible"][i, :m] = torch.tensor(r["visible"])
            out["packed_branch_start"][i, :m] = torch.tensor(r["branch_start"])
        return out


def select_packed_records(batch: dict[str, torch.Tensor], records: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sub-batch of a packed training batch that scores the given records (one score each).

    It keeps the rows holding them (and so the tokens of their rows' other records, which are
    forwarded but not scored: the kept scores see exactly what they saw in the whole batch).
    """
    records = records.to(torch.long).cpu()
    score_row = batch["score_row"].cpu()[records]
    rows = torch.unique(score_row)  # sorted
    renumber = torch.full((int(batch["input_ids"].shape[0]),), -1, dtype=torch.long)
    renumber[rows] = torch.arange(rows.numel())
    out = {k: batch[k][rows.to(batch[k].device)] for k in
           ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids", "packed_visible", "packed_branch_start")}
    out.update(select_images(batch, rows))
    device = batch["score_index"].device
    out["score_row"] = renumber[score_row].to(device)
    out["score_index"] = batch["score_index"][records.to(device)]
    out["item_index"] = torch.arange(records.numel(), device=device)
    out["domain"] = batch["domain"][records.to(batch["domain"].device)]
    out["target"] = batch["target"][records.to(batch["target"].device)]
    if "record" in batch:
        out["record"] = batch["record"][records.to(batch["record"].device)]
    return out


def make_collator(processor: Any, packing: str, layout: ChainLayout | None = None, adapter: Any = None) -> PRMCollator:
    """The collator of a ``--packing`` mode: 'none' one row per text, 'chain' one row per item;
    ``layout`` the head's chat layout (default: one user turn), ``adapter`` the backbone's
    (default: Qwen2-VL's)."""
    if packing not in PACKING_MODES:
        raise ValueError(f"--packing must be one of {PACKING_MODES}, got {packing!r}")
    cls = PackedPRMCollator if packing == "chain" else PRMCollator
    return cls(processor, layout or ChainLayout(), adapter or ADAPTERS["qwen2_vl"])
