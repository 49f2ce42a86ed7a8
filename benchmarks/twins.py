"""False negatives in the mined lists, measured against the synthetic scene records.

    python benchmarks/twins.py [--params params.yaml] [--top 4] [--thresholds 0.9 0.95] [--relative-margins 0.05]

A mined neighbour is a semantic twin when its image (a caption: the image owning it) has the same scene
description (`pipeline.synthetic.description`) as the anchor's image: every caption of one describes the
other equally well, so it is a false negative that exact caption matching cannot see. For each filter
setting this mines the train split afresh (temporary folder) and prints, per direction, the share of the
top `--top` neighbours that are twins (all anchors, and single-object anchors, whose descriptions
collide most), and the share of near-duplicate partners (one attribute changed: the hard negatives
wanted) still among them. Writes `twins.json` in --out. About 10 s per setting on the 2-core CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from pipeline.common import atomic
from pipeline.common.params import load_params
from pipeline.corpus import synthetic
from pipeline.features import schema, store
from pipeline.mining import negatives

from students import jsonable


def scene_table(corpus_dir: Path, features_dir: str, split: str, image_size: int):
    """Per image id of the features split: its scene description, object count and near-duplicate source key."""
    records = {}
    for path in sorted(corpus_dir.glob(f"{split}-*.tar")):
        for record in synthetic.read_records(path):
            records[record["key"]] = record
    keys = store.read_images(features_dir, split, columns=[schema.IMAGE_ID, schema.KEY])[schema.KEY].to_pylist()
    scenes = [synthetic.Scene.from_dict(records[k]["scene"]) for k in keys]
    index = {k: i for i, k in enumerate(keys)}
    partner = np.full(len(keys), -1)
    for i, k in enumerate(keys):  # near-duplicate pairs, both ways
        source = records[k]["near_duplicate_of"]
        if source in index:
            partner[i], partner[index[source]] = index[source], i
    descriptions = np.array([synthetic.description(s, image_size) for s in scenes])
    return descriptions, np.array([len(s.objects) for s in scenes]), partner


def leak(negatives_dir: Path, split: str, descriptions, n_objects, partner, text_image, top: int) -> dict:
    out = {}
    for direction in schema.NEIGHBOR_DIRECTIONS:
        ids, _ = store.read_neighbors(negatives_dir, split, direction)
        ids = ids[:, :top]
        anchor = np.arange(len(ids)) if direction[0] == "i" else text_image
        owner = np.where(ids >= 0, ids if direction[-1] == "i" else text_image[np.maximum(ids, 0)], -1)
        valid = owner >= 0
        twin = valid & (descriptions[np.maximum(owner, 0)] == descriptions[anchor][:, None])
        single = n_objects[anchor] == 1
        has_partner = partner[anchor] >= 0
        kept = (owner == partner[anchor][:, None]).any(axis=1)
        out[direction] = {
            "twin_share": float(twin.sum() / max(1, valid.sum())),
            "twin_share_single_object": float(twin[single].sum() / max(1, valid[single].sum())),
            "near_duplicate_partner_kept": float(kept[has_partner].mean()) if has_partner.any() else None,
            "filled": float(valid.mean()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--top", type=int, default=4, help="neighbours per anchor that training uses (train.distill.hard_negatives)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.97, 0.93, 0.9])
    parser.add_argument("--relative-margins", type=float, nargs="*", default=[0.05])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg, split = params.mine, "train"
    descriptions, n_objects, partner = scene_table(Path(params.corpus.out_dir), cfg.features_dir, split, params.corpus.image_size)
    _, _, text_image = store.load_embeddings(cfg.features_dir, split)
    settings = {"no filter": {"relative_margin": None, "twin_threshold": None}}
    settings.update({f"twin_threshold {t}": {"relative_margin": None, "twin_threshold": t} for t in args.thresholds})
    settings.update({f"relative_margin {m}": {"relative_margin": m, "twin_threshold": None} for m in args.relative_margins})
    current = {"relative_margin": cfg.relative_margin, "twin_threshold": cfg.twin_threshold}
    settings.setdefault("params.yaml", current)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, filters in settings.items():
            run = dataclasses.replace(cfg, out_dir=str(Path(tmp) / name.replace(" ", "_")), splits=[split], **filters)
            negatives.mine(run, progress=False)
            results[name] = {"filters": filters, "directions": leak(Path(run.out_dir), split, descriptions, n_objects, partner, text_image, args.top)}
    print(f"semantic twins among the top {args.top} mined neighbours (train split), and near-duplicate partners kept")
    print(f"{'setting':24s} " + " ".join(f"{d + ' twins':>11s} {'(1-obj)':>8s} {'dup kept':>8s}" for d in schema.NEIGHBOR_DIRECTIONS))
    for name, r in results.items():
        cells = [f"{100 * v['twin_share']:10.1f}% {100 * v['twin_share_single_object']:7.1f}% "
                 f"{100 * (v['near_duplicate_partner_kept'] or 0):7.1f}%" for v in r["directions"].values()]
        print(f"{name:24s} " + " ".join(cells))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write_json(jsonable({"top": args.top, "settings": results}), out / "twins.json")
    print(f"wrote {out / 'twins.json'}")


if __name__ == "__main__":
    main()
