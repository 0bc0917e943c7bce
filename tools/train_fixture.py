"""Train the embedded-default fixture model: RTMDet-nano-person from scratch on synthetic data, CPU.

RTMDet's recipe in miniature (mmdet's rtmdet_*_8xb32 configs, scaled down):
- assignment: DynamicSoftLabelAssigner (soft centre prior 10^(d-3), IoU cost ×3, soft-label
  BCE cost, dynamic k from the top-13 IoUs), exactly as mmdet computes it per image;
- losses: QualityFocalLoss (β=2, IoU as the soft target, averaged over positives) and GIoU
  (×2, weighted by the IoU target); iscrowd regions are ignored (no background loss inside);
- AdamW (lr 2e-3, weight decay 0.05 except norms and biases), linear warm-up then cosine;
- ExpMomentumEMA (momentum 2e-4, γ 2000, buffers averaged); the EMA weights are saved;
- augmentation: random scale 0.5–1.5 around the test letterbox, random placement, horizontal
  flip, brightness/contrast jitter; half of the samples use the exact test letterbox. No hue or
  channel changes: head colour is what tells persons from distractors, and an RGB/BGR bug
  must stay visible to the accuracy gate.

Writes an mmengine-layout checkpoint ({'meta', 'state_dict'}) that rtmbench loads strictly.
Usage (the committed fixture was made with the command and numbers in the README):

    python tools/train_fixture.py --out fixtures/rtmdet-nano-synthetic.pth --steps 3000
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rtmbench.backends.torch_ref import TorchEngine
from rtmbench.data.coco import open_coco
from rtmbench.data.preprocess import decode_image, letterbox, normalize
from rtmbench.data.synthetic import GENERATOR_VERSION, generate
from rtmbench.evaluate import evaluate_engine
from rtmbench.model import RTMDet, get_spec
from rtmbench.postprocess import grid_priors

log = logging.getLogger("train_fixture")
EPS = 1e-7


# ---------------------------------------------------------------- data

def load_split(root: Path, split: str, spec) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode every image once: (uint8[H, W, 3] BGR, float32[N, 4] xyxy persons, float32[M, 4] crowd)."""
    dataset = open_coco(root, spec.class_names, split=f"{split}2017")
    anns = json.loads(dataset.annotation_file.read_text())["annotations"]
    by_image: dict[int, list] = {}
    for ann in anns:
        by_image.setdefault(ann["image_id"], []).append(ann)
    samples = []
    for image_id, path in tqdm(dataset.items(), desc=f"load {split}", unit="img"):
        img = decode_image(path.read_bytes())
        boxes = {0: [], 1: []}
        for ann in by_image.get(image_id, []):
            x, y, w, h = ann["bbox"]
            boxes[ann["iscrowd"]].append([x, y, x + w, y + h])
        samples.append((img, np.array(boxes[0], np.float32).reshape(-1, 4),
                        np.array(boxes[1], np.float32).reshape(-1, 4)))
    return samples


def augment(img, boxes, crowd, size: int, rng: np.random.Generator, pad_value: int):
    """Random scale/placement/flip/photometric jitter → (uint8[size, size, 3], boxes, crowd)."""
    if rng.random() < 0.5:
        canvas, meta = letterbox(img, (size, size), pad_value)
        scale = np.array(meta.scale_factor * 2, np.float32)
        return canvas, boxes * scale, crowd * scale
    h, w = img.shape[:2]
    s = min(size / h, size / w) * rng.uniform(0.5, 1.5)
    new_w, new_h = max(int(w * s + 0.5), 1), max(int(h * s + 0.5), 1)
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    x0 = int(rng.integers(min(0, size - new_w), max(0, size - new_w) + 1))
    y0 = int(rng.integers(min(0, size - new_h), max(0, size - new_h) + 1))
    canvas = np.full((size, size, 3), pad_value, np.uint8)
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    cw, ch = min(new_w - sx0, size - dx0), min(new_h - sy0, size - dy0)
    canvas[dy0:dy0 + ch, dx0:dx0 + cw] = resized[sy0:sy0 + ch, sx0:sx0 + cw]
    shift = np.array([x0, y0, x0, y0], np.float32)
    fx, fy = new_w / w, new_h / h
    scale = np.array([fx, fy, fx, fy], np.float32)

    def place(b):
        moved = b * scale + shift
        clipped = np.clip(moved, 0, size)
        area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        visible = (kept > 0.4 * np.maximum(area, EPS)) & ((clipped[:, 2:] - clipped[:, :2]) >= 2).all(1)
        return clipped[visible]

    boxes, crowd = place(boxes), place(crowd)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1].copy()
        boxes = np.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
        crowd = np.stack([size - crowd[:, 2], crowd[:, 1], size - crowd[:, 0], crowd[:, 3]], 1)
    if rng.random() < 0.5:
        alpha, beta = rng.uniform(0.75, 1.25), rng.uniform(-25, 25)
        canvas = cv2.convertScaleAbs(canvas, alpha=alpha, beta=beta)
    return canvas, boxes.reshape(-1, 4), crowd.reshape(-1, 4)


# ---------------------------------------------------------------- assignment and losses

def box_iou(a: torch.Tensor, b: torch.Tensor, aligned: bool = False, giou: bool = False) -> torch.Tensor:
    """IoU (or GIoU) of xyxy boxes: pairwise [N, M], or elementwise [N] when ``aligned``."""
    if not aligned:
        a, b = a[:, None], b[None]
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter + EPS
    iou = inter / union
    if not giou:
        return iou
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1) + EPS
    return iou - (hull - union) / hull


@torch.no_grad()
def dynamic_soft_label_assign(logits, boxes, priors, strides, gt, topk: int = 13,
                              iou_weight: float = 3.0, center_radius: float = 3.0):
    """mmdet's DynamicSoftLabelAssigner for one image and one class.

    logits float[P], boxes float[P, 4] decoded predictions, priors float[P, 2], strides float[P],
    gt float[G, 4] → (gt index int64[P] with -1 for background, IoU target float[P]).
    """
    num_priors = len(priors)
    assigned = torch.full((num_priors,), -1, dtype=torch.long)
    targets = torch.zeros(num_priors)
    if len(gt) == 0:
        return assigned, targets
    deltas = torch.cat([priors[:, None] - gt[None, :, :2], gt[None, :, 2:] - priors[:, None]], -1)
    valid = deltas.min(-1).values.gt(0).any(1)
    if not valid.any():
        return assigned, targets
    v_boxes, v_logits, v_priors = boxes[valid], logits[valid], priors[valid]
    gt_center = (gt[:, :2] + gt[:, 2:]) / 2
    distance = (v_priors[:, None] - gt_center[None]).pow(2).sum(-1).sqrt() / strides[valid][:, None]
    center_cost = torch.pow(10, distance - center_radius)
    ious = box_iou(v_boxes, gt)
    iou_cost = -torch.log(ious + EPS) * iou_weight
    score_logits = v_logits[:, None].expand_as(ious)
    cls_cost = (F.binary_cross_entropy_with_logits(score_logits, ious, reduction="none")
                * (ious - score_logits.sigmoid()).abs().pow(2))
    cost = cls_cost + iou_cost + center_cost
    # dynamic k: each GT takes as many lowest-cost priors as its top-13 IoUs sum to.
    k = min(topk, len(v_boxes))
    dynamic_ks = ious.topk(k, dim=0).values.sum(0).int().clamp(min=1)
    matching = torch.zeros_like(cost, dtype=torch.bool)
    for g in range(len(gt)):
        matching[cost[:, g].topk(int(dynamic_ks[g]), largest=False).indices, g] = True
    multiple = matching.sum(1) > 1
    if multiple.any():
        best = cost[multiple].argmin(1)
        matching[multiple] = False
        matching[multiple.nonzero()[:, 0], best] = True
    fg = matching.any(1)
    gt_index = matching[fg].float().argmax(1)
    valid_idx = valid.nonzero()[:, 0][fg]
    assigned[valid_idx] = gt_index
    targets[valid_idx] = ious[fg, gt_index]
    return assigned, targets


def quality_focal_loss(logits, targets, beta: float = 2.0):
    """QFL per element: logits float[P], soft targets float[P] (IoU for positives, 0 else)."""
    sigmoid = logits.sigmoid()
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (targets - sigmoid).abs().pow(beta)


def detection_loss(outputs, batch_gt, batch_crowd, priors, strides):
    """Mean QFL over positives + 2 × IoU-weighted GIoU loss, for one batch."""
    levels = len(outputs) // 2
    logits = torch.cat([o.flatten(2).transpose(1, 2) for o in outputs[:levels]], 1)[..., 0]  # [B, P]
    dist = torch.cat([o.flatten(2).transpose(1, 2) for o in outputs[levels:]], 1)  # [B, P, 4]
    boxes = torch.cat([priors[None] - dist[..., :2], priors[None] + dist[..., 2:]], -1)
    cls_terms, box_terms, num_pos, weight_sum = [], [], 0, 0.0
    for b, (gt, crowd) in enumerate(zip(batch_gt, batch_crowd)):
        assigned, targets = dynamic_soft_label_assign(logits[b].detach(), boxes[b].detach(),
                                                      priors, strides, gt)
        loss = quality_focal_loss(logits[b], targets)
        if len(crowd):  # no background loss inside crowd regions
            inside = ((priors[:, None] > crowd[None, :, :2]) & (priors[:, None] < crowd[None, :, 2:])).all(-1).any(1)
            loss = loss * ~(inside & (assigned < 0))
        cls_terms.append(loss.sum())
        pos = assigned >= 0
        num_pos += int(pos.sum())
        if pos.any():
            weight = targets[pos]
            giou = box_iou(boxes[b][pos], gt[assigned[pos]], aligned=True, giou=True)
            box_terms.append(((1 - giou) * weight).sum())
            weight_sum += float(weight.sum())
    loss_cls = torch.stack(cls_terms).sum() / max(num_pos, 1)
    loss_box = 2.0 * torch.stack(box_terms).sum() / max(weight_sum, 1e-6) if box_terms else logits.sum() * 0
    return loss_cls, loss_box


# ---------------------------------------------------------------- model helpers

def init_like_mmdet(model: RTMDet, prior_prob: float = 0.01) -> None:
    """mmdet's RTMDet head init: N(0, 0.01) head convs, classification bias for prior_prob."""
    for module in model.bbox_head.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for conv in model.bbox_head.rtm_cls:
        torch.nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))


class ExpMomentumEMA:
    """mmdet's ExpMomentumEMA: momentum = (1 - m)·exp(-(1 + step)/γ) + m, buffers averaged too."""

    def __init__(self, model, momentum: float = 2e-4, gamma: float = 2000):
        self.model = copy.deepcopy(model).eval()
        self.momentum, self.gamma, self.steps = momentum, gamma, 0

    @torch.no_grad()
    def update(self, model) -> None:
        m = (1 - self.momentum) * math.exp(-(1 + self.steps) / self.gamma) + self.momentum
        for ema_v, v in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_v.mul_(1 - m).add_(v.detach(), alpha=m)
            else:
                ema_v.copy_(v)
        self.steps += 1


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate(model, spec, root: Path, max_images: int) -> dict:
    dataset = open_coco(root, spec.class_names)
    result = evaluate_engine(dataset, TorchEngine(model, "fp32"), spec, batch_size=32,
                             max_images=max_images, progress=False)
    return result.metrics


# ---------------------------------------------------------------- main

def _generated_as(annotations: Path, seed: int, num_images: int) -> bool:
    """Whether the split at ``annotations`` was generated with this seed, size and generator."""
    try:
        info = json.loads(annotations.read_text())["info"]
    except (OSError, ValueError, KeyError):
        return False
    return (info.get("seed"), info.get("num_images"), info.get("version")) == (seed, num_images,
                                                                              str(GENERATOR_VERSION))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--work-dir", type=Path, default=Path("build/train_fixture"))
    parser.add_argument("--model", default="rtmdet-nano-synthetic")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--train-seed", type=int, default=1000)
    parser.add_argument("--val-seed", type=int, default=2000, help="validation split, never trained on")
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=Path, help="training state saved by an earlier run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 keeps a shared machine usable; default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    spec = get_spec(args.model)
    size = spec.input_size[0]
    train_root, val_root = args.work_dir / "train", args.work_dir / "val"
    for root, split, seed, count in ((train_root, "train", args.train_seed, args.train_images),
                                     (val_root, "val", args.val_seed, args.val_images)):
        if not _generated_as(root / "annotations" / f"person_keypoints_{split}2017.json", seed, count):
            shutil.rmtree(root, ignore_errors=True)  # another seed or size: its images would stay beside
            generate(root, seed, count, split)
    samples = load_split(train_root, "train", spec)

    model = RTMDet(spec)
    init_like_mmdet(model)
    model = model.to(memory_format=torch.channels_last)
    ema = ExpMomentumEMA(model)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    start_step = 0
    state_file = args.work_dir / "train_state.pt"
    if args.resume:
        state = torch.load(args.resume, weights_only=True)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.steps = state["ema_steps"]
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    featmap_sizes = [(size // s, size // s) for s in spec.strides]
    priors = torch.from_numpy(grid_priors(featmap_sizes, spec.strides))
    strides = torch.cat([torch.full((h * w,), float(s)) for (h, w), s in zip(featmap_sizes, spec.strides)])
    began = time.time()
    model.train()
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="train")
    for step in bar:
        picks = rng.integers(0, len(samples), args.batch_size)
        images, gts, crowds = [], [], []
        for i in picks:
            img, boxes, crowd = augment(*samples[i], size, rng, spec.pad_value)
            images.append(img)
            gts.append(torch.from_numpy(boxes))
            crowds.append(torch.from_numpy(crowd))
        inputs = torch.from_numpy(normalize(np.stack(images), spec.mean, spec.std)).contiguous(
            memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss_cls, loss_box = detection_loss(model(inputs), gts, crowds, priors, strides)
        optimizer.zero_grad(set_to_none=True)
        (loss_cls + loss_box).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        ema.update(model)
        bar.set_postfix(cls=f"{loss_cls.item():.3f}", box=f"{loss_box.item():.3f}", lr=f"{lr_at(step):.1e}")
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            metrics = evaluate(ema.model, spec, val_root, args.val_images)
            log.info("step %d (%.0f min): val mAP %.4f mAP50 %.4f", done, (time.time() - began) / 60,
                     metrics["mAP"], metrics["mAP50"])
            torch.save({"model": model.state_dict(), "ema": ema.model.state_dict(), "ema_steps": ema.steps,
                        "optimizer": optimizer.state_dict(), "step": done}, state_file)
            save_checkpoint(ema.model, args, spec, done, metrics, time.time() - began)


def save_checkpoint(model, args, spec, step: int, metrics: dict, seconds: float) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"dataset_meta": {"classes": tuple(spec.class_names)}, "model": spec.name,
            "trained_by": "tools/train_fixture.py", "steps": step, "batch_size": args.batch_size,
            "train_seed": args.train_seed, "train_images": args.train_images, "seed": args.seed,
            "val_seed": args.val_seed, "val_metrics": metrics, "train_minutes": round(seconds / 60, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".part")
    torch.save({"meta": meta, "state_dict": state}, tmp)
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
