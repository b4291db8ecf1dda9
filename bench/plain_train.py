"""A plain torch training loop on preloaded features: the baseline of `train_speed.py --whole-process`.

As a user would write it around the same network and loss, in its own process and the
environment it was given (no OpenMP setting): read every cached map of the training pairs' images
into memory with zarr (before timing), then per step stack one pair's maps, run the network on
both images, take the symmetric cross-entropy and an AdamW step. No loader threads, no metrics
file, no checkpoints. It prints one JSON line: the process's phases and the mean step time.

    python bench/plain_train.py CACHE.zarr SPAIR_DIR --steps 60 --projection-dim 64 --output-size 32 --norm-groups 16
"""

import argparse
import json
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from dhf_cache.aggregator.network import AggregationNetwork  # noqa: E402  (the network and loss being timed)
from dhf_cache.datasets import open_dataset  # noqa: E402
from dhf_cache.cache.layers import LayerInfo  # noqa: E402
from dhf_cache.aggregator.losses import grid_keypoints, symmetric_ce_loss  # noqa: E402

IMPORTED = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache")
    p.add_argument("spair")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--projection-dim", type=int, default=64)
    p.add_argument("--output-size", type=int, default=32)
    p.add_argument("--norm-groups", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    root = zarr.open_group(args.cache, mode="r")
    meta = root.attrs["dhf_cache"]
    layers = [LayerInfo(**layer) for layer in meta["layers"]]
    ids = [str(i) for i in root["image_ids"][:]]
    index = {image_id: i for i, image_id in enumerate(ids)}
    pairs = [q for q in open_dataset(f"spair:{args.spair}").pairs("trn") if len(q.src_kps)]
    needed = sorted({index[i] for q in pairs for i in (q.src, q.trg)})
    features = {i: {layer.name: torch.from_numpy(root[f"features/{layer.name}"][i]) for layer in layers} for i in needed}
    loaded = time.perf_counter()

    torch.manual_seed(args.seed)
    network = AggregationNetwork(layers, len(meta["timesteps"]), args.projection_dim, args.output_size, args.norm_groups)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.0)
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    grid = args.output_size
    step_times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        pair = pairs[order[step % len(pairs)]]
        src, trg = features[index[pair.src]], features[index[pair.trg]]
        inputs = {layer.name: torch.stack([src[layer.name], trg[layer.name]]) for layer in layers}
        desc = network(inputs)
        loss = symmetric_ce_loss(desc[0], desc[1], grid_keypoints(pair.src_kps, pair.src_size, grid),
                                 grid_keypoints(pair.trg_kps, pair.trg_size, grid))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())
        step_times.append(time.perf_counter() - t0)
    end = time.perf_counter()
    print(json.dumps({"import_s": IMPORTED - START, "load_s": loaded - IMPORTED, "loop_s": end - loaded,
                      "process_s": end - START, "steps": args.steps, "step_s": (end - loaded) / args.steps,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
