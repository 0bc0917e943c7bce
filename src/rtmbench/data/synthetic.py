"""Deterministic synthetic person-detection dataset in the exact COCO layout.

The embedded default (README, "What it does") needs data that a tiny RTMDet can learn "person" from and on
which deployment bugs cost accuracy. Each image is a textured background with, painted back
to front (lower on the image = nearer = painted later):

- persons: articulated figures (head, neck, torso, two-segment arms and legs, hands, shoes,
  optional hair and dress) in standing, walking, arms-raised, sitting and crouching poses,
  clothing in random colours, skin (head, hands, bare forearms) in a human skin tone;
- mannequins: the same figures with skin in the channel-swapped, blue-green tones. They are
  not annotated, so an RGB↔BGR swap in a deployment turns persons into mannequins and
  mannequins into persons, and the accuracy gate sees it;
- upright non-person objects (poles, lamps, bottles, vases, trees, signs, boxes) and clutter
  (lines, blobs, polygons), not annotated;
- now and then a dense cluster of tiny persons, annotated as one ``iscrowd=1`` box as COCO does.

About 9% of images have no person. Images range from 80 px on the long side to 1000 x 150
strips; the scene scale is drawn per image so that COCO small, medium and large persons all
occur often.

Annotations: ``bbox`` is the tight box of the figure's pixels as painted, including parts
that later-painted things hide, clipped to the image; ``area`` is the figure's visible pixel
count (COCO's area is the mask area). A person hidden more than ``max_hidden_fraction`` is
annotated ``iscrowd=1`` (an ignore region); one hidden completely is not annotated.

Determinism: image ``k`` is drawn from ``numpy.random.default_rng([seed, split_code, k])``
alone, so it does not depend on how many images are made, and the same (seed, split,
num_images) gives byte-identical files with the same numpy and OpenCV versions.

Completeness: the annotation JSON is removed first and written last, atomically; a directory
with images but no JSON is an interrupted run.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import RtmbenchError
from ..fsutil import write_bytes_atomic

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the same seed would draw different images
SPLIT_CODES = {"val": 0, "train": 1}
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}]

# Skin tones, BGR: a person's skin interpolates between these (red channel highest); a
# mannequin's skin is the same tone with B and R swapped (blue highest).
SKIN_DARK_BGR = np.array([60, 90, 140], np.float32)
SKIN_LIGHT_BGR = np.array([140, 180, 235], np.float32)
HAIR_BGR = np.array([[20, 20, 25], [30, 45, 70], [45, 75, 120], [110, 170, 210],
                     [150, 150, 150], [40, 70, 150]], np.float32)

# Figure part codes in a sprite mask (0 = empty); the palette row with that index is its colour.
LEGS, SHOES, TORSO, SLEEVES, SKIN, HAIR = 1, 2, 3, 4, 5, 6

# Joint rows of body_joints(); per-side joints add 0 (image left) or 1 (image right).
NECK, HEAD, HIP, KNEE, ANKLE, SHOULDER, ELBOW, WRIST = 0, 1, 2, 4, 6, 8, 10, 12
UPPER_BODY = [NECK, HEAD, SHOULDER, SHOULDER + 1, ELBOW, ELBOW + 1, WRIST, WRIST + 1]
# Body proportions in units of standing height (head top to soles ~1), y down, pelvis at 0.
SHOULDER_Y, NECK_Y, HEAD_Y = -0.29, -0.335, -0.405
HEAD_RX, HEAD_RY = 0.05, 0.065
SHOULDER_HALF, HIP_HALF = 0.1, 0.06
UPPER_ARM, FOREARM, THIGH, SHIN = 0.16, 0.14, 0.245, 0.235
THICK_THIGH, THICK_SHIN, THICK_UPPER_ARM, THICK_FOREARM, THICK_NECK = 0.075, 0.06, 0.05, 0.042, 0.045
HAND_R = 0.028

SUBPIXEL_BITS = 4  # cv2 drawing "shift": coordinates carry 4 fractional bits
SUBPIXEL = 1 << SUBPIXEL_BITS
GAIN_ONE = 128  # a uint8 gain map's value for gain 1 (gains stay below 1.75)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Tunable parameters of the generator; the defaults are what the fixture model trains on.

    Image size: with ``strip_image_prob`` a 600–1000 x 150–260 strip (landscape or portrait),
    with ``small_image_prob`` a long side in ``small_image_long_side`` (aspect up to 2),
    otherwise each side uniform in ``image_side_range``.

    Persons: ``person_free_prob`` of images have none. Otherwise the image draws one
    ``scene_scales`` row (probability, lowest and highest figure height as a fraction of
    image height, most persons) and its persons' heights around one log-uniform draw in that
    range; heights never go below ``min_person_height`` px. ``group_prob``: persons of an
    image stand side by side on one ground line and overlap.
    Crowds: with ``crowd_prob`` an image holds a cluster of ``crowd_count`` figures
    ``crowd_figure_height`` px tall, annotated as one ``iscrowd=1`` box.
    Unannotated things per image are Poisson with these means, capped at 3x the mean:
    ``mean_mannequins`` (at least ``min_mannequin_height`` px tall, so that their head colour
    is resolvable), ``mean_objects``, ``mean_clutter``.
    """

    strip_image_prob: float = 0.08
    small_image_prob: float = 0.12
    small_image_long_side: tuple[int, int] = (80, 320)
    image_side_range: tuple[int, int] = (200, 640)
    person_free_prob: float = 0.09
    scene_scales: tuple[tuple[float, float, float, int], ...] = (
        (0.4, 0.6, 1.4, 4), (0.3, 0.2, 0.6, 5), (0.3, 0.0, 0.2, 7))
    min_person_height: int = 12
    group_prob: float = 0.4
    max_hidden_fraction: float = 0.7
    crowd_prob: float = 0.08
    crowd_count: tuple[int, int] = (12, 40)
    crowd_figure_height: tuple[int, int] = (7, 16)
    mean_mannequins: float = 0.8
    min_mannequin_height: int = 24
    mean_objects: float = 1.5
    mean_clutter: float = 3.0
    jpeg_quality: tuple[int, int] = (60, 95)


@dataclasses.dataclass(frozen=True)
class Pose:
    """Limb angles in radians from straight down (positive turns toward +x), per side
    (image-left limb, image-right limb); ``torso_lean`` rotates everything above the pelvis;
    ``width`` scales shoulder and hip width (1 = facing the camera, ~0.45 = side view);
    ``facing`` is -1 or +1, the direction shoes point and a sitting figure faces."""

    upper_arm: tuple[float, float]
    forearm: tuple[float, float]
    thigh: tuple[float, float]
    shin: tuple[float, float]
    torso_lean: float
    width: float
    facing: int
    upright: bool  # standing, walking or arms raised (a dress fits)


@dataclasses.dataclass(frozen=True)
class Head:
    """A figure's head in image pixels: centre (x, y), smaller semi-axis ``radius``; ``visible``:
    nothing painted later covers the centre pixel."""

    centre: tuple[int, int]
    radius: float
    is_person: bool
    visible: bool


@dataclasses.dataclass
class Sprite:
    """One painted thing: ``mask`` uint8[h, w] of part codes (0 = empty), top-left ``origin``
    (x, y) in the image, ``palette`` the part codes' BGR colours (see :func:`palette`).
    ``target``: index of the annotation it belongs to (-1 = not annotated).
    ``head_centre``/``head_radius``: in mask pixels, figures only."""

    mask: np.ndarray
    palette: np.ndarray
    origin: tuple[int, int] = (0, 0)
    target: int = -1
    is_person: bool = False
    head_centre: tuple[float, float] | None = None
    head_radius: float = 0.0


@dataclasses.dataclass(frozen=True)
class Rendering:
    """One generated image: ``image`` uint8[H, W, 3] BGR (before JPEG), ``annotations``: COCO
    annotation dicts without ``id`` and ``image_id``, ``heads``: every figure's head."""

    image: np.ndarray
    annotations: list[dict]
    heads: list[Head]


# ---------------------------------------------------------------------------- sampling helpers

def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def capped_poisson(rng: np.random.Generator, mean: float) -> int:
    return int(min(rng.poisson(mean), math.ceil(3 * mean)))


def weighted_index(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """Index i drawn with probability weights[i] / sum(weights)."""
    return bisect.bisect(list(itertools.accumulate(weights)), rng.random() * sum(weights))


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """float32[3] BGR, uniform then desaturated toward its grey by a random amount."""
    colour = rng.uniform(0, 255, 3)
    grey = colour.sum() / 3
    return (grey + rng.uniform(0.2, 1.0) * (colour - grey)).astype(np.float32)


def skin_tone(rng: np.random.Generator, mannequin: bool) -> np.ndarray:
    """float32[3] BGR: a human skin tone (red highest), or its B/R swap for a mannequin."""
    tone = SKIN_DARK_BGR + rng.random() * (SKIN_LIGHT_BGR - SKIN_DARK_BGR)
    tone = tone + rng.uniform(-8, 8, 3).astype(np.float32)
    return tone[::-1].copy() if mannequin else tone


def palette(*colours: np.ndarray) -> np.ndarray:
    """uint8[1, 256, 3], a cv2.LUT table: entry i = colours[i - 1] (BGR), the rest black."""
    table = np.zeros((1, 256, 3), np.float32)
    table[0, 1:len(colours) + 1] = colours
    return np.clip(table, 0, 255).astype(np.uint8)


def fixed(points: np.ndarray) -> np.ndarray:
    """float[..., 2] pixel coordinates → int32 fixed point for cv2 drawing with SUBPIXEL_BITS."""
    return np.round(np.asarray(points) * SUBPIXEL).astype(np.int32)


# ------------------------------------------------------------------------------------ figures

def sample_pose(rng: np.random.Generator) -> Pose:
    """Standing 40%, walking 30%, arms raised 15%, sitting or crouching 15%."""
    u = rng.uniform
    facing = 1 if rng.random() < 0.5 else -1
    kind = weighted_index(rng, (0.4, 0.3, 0.15, 0.15))
    if kind == 0:  # standing, arms hanging or slightly out
        arms = (-u(0.05, 0.4), u(0.05, 0.4))
        forearms = (arms[0] - u(-0.2, 0.5), arms[1] + u(-0.2, 0.5))
        thighs = (-u(0.0, 0.15), u(0.0, 0.15))
        return Pose(arms, forearms, thighs, (thighs[0] + u(-0.05, 0.05), thighs[1] + u(-0.05, 0.05)),
                    u(-0.08, 0.08), u(0.6, 1.0), facing, True)
    if kind == 1:  # walking, seen from the side: legs apart, arms swinging opposite
        stride, bend = u(0.25, 0.5), u(0.0, 0.6)  # the back leg's knee bends
        thighs = (-stride, stride)
        shins = (-stride - bend, stride) if facing > 0 else (-stride, stride + bend)
        arms = (0.6 * stride + u(-0.1, 0.1), -0.6 * stride + u(-0.1, 0.1))
        forearms = (arms[0] + facing * u(0.1, 0.7), arms[1] + facing * u(0.1, 0.7))
        return Pose(arms, forearms, thighs, shins, facing * u(0.0, 0.12), u(0.45, 0.7), facing, True)
    if kind == 2:  # one or both arms raised
        raised = [rng.random() < 0.7, True]
        rng.shuffle(raised)
        arms = tuple(sign * (u(2.3, 3.1) if up else u(0.05, 0.4)) for sign, up in zip((-1, 1), raised))
        forearms = tuple(a + sign * u(-0.4, 0.3) for sign, a in zip((-1, 1), arms))
        thighs = (-u(0.0, 0.15), u(0.0, 0.15))
        return Pose(arms, forearms, thighs, thighs, u(-0.08, 0.08), u(0.7, 1.0), facing, True)
    if rng.random() < 0.5:  # sitting: thighs forward, shins down, hands on the knees
        thighs = (facing * u(1.3, 1.7), facing * u(1.3, 1.7))
        shins = (u(-0.25, 0.25), u(-0.25, 0.25))
        lean = facing * u(-0.1, 0.2)
    else:  # crouching: knees up in front, feet back under the hips, torso leaning forward
        thighs = (facing * u(1.6, 2.2), facing * u(1.6, 2.2))
        shins = (-facing * u(0.2, 0.6), -facing * u(0.2, 0.6))
        lean = facing * u(0.2, 0.55)
    arms = (facing * u(0.2, 0.7), facing * u(0.2, 0.7))
    forearms = (arms[0] + facing * u(0.5, 1.1), arms[1] + facing * u(0.5, 1.1))
    return Pose(arms, forearms, thighs, shins, lean, u(0.45, 0.8), facing, False)


def rotation(angle: float) -> np.ndarray:
    """float[2, 2] turning +angle toward +x for points above the origin (y down)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def body_joints(pose: Pose) -> np.ndarray:
    """float[14, 2] joint positions (x, y) in body units: pelvis at origin, y down, height ~1.

    Rows: NECK, HEAD, then per side s in (0, 1): HIP + s, KNEE + s, ANKLE + s, SHOULDER + s,
    ELBOW + s, WRIST + s."""
    joints = [(0.0, NECK_Y), (0.0, HEAD_Y)] + [(0.0, 0.0)] * 12
    for side, sign in enumerate((-1, 1)):
        joints[HIP + side] = (sign * HIP_HALF * pose.width, 0.0)
        joints[SHOULDER + side] = (sign * SHOULDER_HALF * pose.width, SHOULDER_Y)
        for start, end, length, angle in ((HIP, KNEE, THIGH, pose.thigh[side]),
                                          (KNEE, ANKLE, SHIN, pose.shin[side]),
                                          (SHOULDER, ELBOW, UPPER_ARM, pose.upper_arm[side]),
                                          (ELBOW, WRIST, FOREARM, pose.forearm[side])):
            x, y = joints[start + side]
            joints[end + side] = (x + length * math.sin(angle), y + length * math.cos(angle))
    array = np.array(joints)
    array[UPPER_BODY] = array[UPPER_BODY] @ rotation(pose.torso_lean).T
    return array


def figure_sprite(rng: np.random.Generator, height: float, mannequin: bool) -> Sprite:
    """A person (or mannequin) ``height`` px tall when standing, in a random pose and outfit."""
    pose = sample_pose(rng)
    tilt = rng.uniform(-0.06, 0.06)
    joints = body_joints(pose) @ rotation(tilt).T * height
    margin = 0.1 * height + 2
    corner = joints.min(axis=0) - margin
    joints -= corner
    width, tall = np.ceil(joints.max(axis=0) + margin).astype(int)
    mask = np.zeros((tall, width), np.uint8)
    points = [tuple(p) for p in fixed(joints).tolist()]
    xy = joints.tolist()

    def line(a: int, b: int, part: int, thickness: float) -> None:
        cv2.line(mask, points[a], points[b], part, max(1, round(thickness * height)), cv2.LINE_8,
                 SUBPIXEL_BITS)

    def ellipse(x: float, y: float, x_axis: float, y_axis: float, angle: float, part: int,
                start: float = 0, end: float = 360) -> None:
        cv2.ellipse(mask, (round(x * SUBPIXEL), round(y * SUBPIXEL)),
                    (round(max(x_axis, 0.5) * SUBPIXEL), round(max(y_axis, 0.5) * SUBPIXEL)),
                    angle, start, end, part, -1, cv2.LINE_8, SUBPIXEL_BITS)

    for side in (0, 1):
        line(HIP + side, KNEE + side, LEGS, THICK_THIGH)
        line(KNEE + side, ANKLE + side, LEGS, THICK_SHIN)
        x, y = xy[ANKLE + side]
        ellipse(x + pose.facing * 0.02 * height, y + 0.012 * height, 0.045 * height,
                0.022 * height, 0, SHOES)
    torso = joints[[SHOULDER, SHOULDER + 1, HIP + 1, HIP]]
    if pose.upright and rng.random() < 0.2:  # dress down to the knees
        hem = [joints[KNEE + 1] + (0.06 * height, 0), joints[KNEE] - (0.06 * height, 0)]
        cv2.fillPoly(mask, [fixed([torso[1], *hem, torso[0]])], TORSO, cv2.LINE_8, SUBPIXEL_BITS)
    outward = np.array([[-1, -0.1], [1, -0.1], [1, 0.15], [-1, 0.15]]) * 0.035 * height
    cv2.fillPoly(mask, [fixed(torso + outward)], TORSO, cv2.LINE_8, SUBPIXEL_BITS)
    line(NECK, HEAD, SKIN, THICK_NECK)
    bare_forearms = rng.random() < 0.3
    for side in (0, 1):
        line(SHOULDER + side, ELBOW + side, SLEEVES, THICK_UPPER_ARM)
        line(ELBOW + side, WRIST + side, SKIN if bare_forearms else SLEEVES, THICK_FOREARM)
        ellipse(*xy[WRIST + side], HAND_R * height, HAND_R * height, 0, SKIN)
    (head_x, head_y), head_angle = xy[HEAD], pose.torso_lean + tilt
    ellipse(head_x, head_y, HEAD_RX * height, HEAD_RY * height, math.degrees(head_angle), SKIN)
    if rng.random() < 0.85:  # hair cap over the top of the head, the face centre stays skin
        up = 0.4 * HEAD_RY * height  # shift the cap up along the tilted head axis
        ellipse(head_x + up * math.sin(head_angle), head_y - up * math.cos(head_angle),
                1.08 * HEAD_RX * height, 0.7 * HEAD_RY * height, math.degrees(head_angle), HAIR,
                180, 360)

    torso_colour = random_colour(rng)
    sleeves = torso_colour if rng.random() < 0.75 else random_colour(rng)
    hair = HAIR_BGR[rng.integers(len(HAIR_BGR))] + rng.uniform(-10, 10, 3)
    colours = palette(random_colour(rng), rng.uniform(0, 90, 3), torso_colour, sleeves,
                      skin_tone(rng, mannequin), hair)
    return Sprite(mask, colours, is_person=not mannequin, head_centre=(head_x, head_y),
                  head_radius=min(HEAD_RX, HEAD_RY) * height)


# ------------------------------------------------------------------------------------ objects

def lathe_silhouette(rng: np.random.Generator, height: float) -> np.ndarray:
    """int32[N, 2] fixed-point polygon of a bottle, vase or bollard: a random half-width
    profile mirrored about a vertical axis, ``height`` px tall."""
    body = rng.uniform(0.15, 0.3) * height
    neck = body * rng.uniform(0.25, 0.9)
    widths = [neck, neck, body * rng.uniform(0.6, 1.0), body, body * rng.uniform(0.7, 1.0),
              body * rng.uniform(0.5, 1.0)]
    levels = np.array([0.0, rng.uniform(0.1, 0.35), 0.45, 0.6, 0.85, 1.0]) * (height - 1)
    half = np.array(widths)
    right = np.stack([body + half, levels], axis=1)
    left = np.stack([body - half, levels], axis=1)[::-1]
    return fixed(np.concatenate([right, left]))


def object_sprite(rng: np.random.Generator, height: float) -> Sprite:
    """An upright non-person shape about ``height`` px tall: pole or lamp, bottle or vase,
    tree, sign, or box; random colours (trees green and brown)."""
    h = max(int(height), 8)
    kind = rng.integers(5)
    if kind == 0:  # pole, sometimes a lamp on top
        width = max(2, int(h * rng.uniform(0.03, 0.08)))
        lamp = int(width * rng.uniform(1.5, 3)) if rng.random() < 0.5 else 0
        mask = np.zeros((h + lamp, max(width, 2 * lamp + 1)), np.uint8)
        cx = mask.shape[1] // 2
        mask[lamp:, cx - width // 2: cx - width // 2 + width] = 1
        if lamp:
            cv2.circle(mask, (cx, lamp), lamp, 2, -1)
        return Sprite(mask, palette(random_colour(rng), random_colour(rng)))
    if kind == 1:  # bottle, vase or bollard
        polygon = lathe_silhouette(rng, h)
        mask = np.zeros((h, int(polygon[:, 0].max() / SUBPIXEL) + 2), np.uint8)
        cv2.fillPoly(mask, [polygon], 1, cv2.LINE_8, SUBPIXEL_BITS)
        return Sprite(mask, palette(random_colour(rng)))
    if kind == 2:  # tree: trunk and one to three canopy ellipses
        width = int(h * rng.uniform(0.4, 0.8))
        mask = np.zeros((h, width), np.uint8)
        trunk = max(2, int(h * rng.uniform(0.05, 0.12)))
        mask[int(h * 0.4):, width // 2 - trunk // 2: width // 2 - trunk // 2 + trunk] = 1
        for _ in range(rng.integers(1, 4)):
            centre = (int(width * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.25, 0.4)))
            axes = (int(width * rng.uniform(0.25, 0.5)), int(h * rng.uniform(0.15, 0.25)))
            cv2.ellipse(mask, centre, axes, 0, 0, 360, 2, -1)
        green = np.array([rng.uniform(10, 90), rng.uniform(70, 200), rng.uniform(10, 110)])
        brown = np.array([rng.uniform(20, 60), rng.uniform(40, 90), rng.uniform(60, 130)])
        return Sprite(mask, palette(brown, green))
    if kind == 3:  # sign: post with a round, square, triangular or octagonal plate
        plate = max(4, int(h * rng.uniform(0.2, 0.4)))
        mask = np.zeros((h, plate + 1), np.uint8)
        post = max(1, int(h * 0.04))
        mask[plate // 2:, plate // 2 - post // 2: plate // 2 - post // 2 + post] = 1
        sides = int(rng.choice([3, 4, 8, 32]))
        angles = np.arange(sides) * 2 * np.pi / sides + np.pi / sides * (sides != 3)
        plate_points = plate / 2 + plate / 2 * np.stack([np.sin(angles), -np.cos(angles)], axis=1)
        cv2.fillPoly(mask, [fixed(plate_points)], 2, cv2.LINE_8, SUBPIXEL_BITS)
        return Sprite(mask, palette(random_colour(rng), random_colour(rng)))
    # box: front face, lighter top face, darker side face
    width, depth = int(h * rng.uniform(0.5, 1.6)) + 2, int(h * rng.uniform(0.1, 0.3))
    mask = np.zeros((h + depth, width + depth), np.uint8)
    mask[depth:, :width] = 1
    top = [[0, depth], [depth, 0], [width + depth, 0], [width, depth]]
    side = [[width, depth], [width + depth, 0], [width + depth, h], [width, h + depth]]
    cv2.fillPoly(mask, [np.array(top, np.int32)], 2)
    cv2.fillPoly(mask, [np.array(side, np.int32)], 3)
    colour = random_colour(rng)
    return Sprite(mask, palette(colour, colour * 1.25 + 20, colour * 0.7))


def clutter_sprite(rng: np.random.Generator, image_hw: tuple[int, int]) -> Sprite:
    """A random line, blob or polygon, up to about a third of the image's shorter side
    (lines may span the image); its origin is already placed."""
    h, w = image_hw
    size = max(4, int(min(h, w) * rng.uniform(0.03, 0.35)))
    kind = rng.integers(3)
    if kind == 0:
        ends = rng.uniform(0, 1, (2, 2)) * (w, h)
        thickness = int(rng.integers(1, 6))
        corner = np.floor(ends.min(axis=0)).astype(int) - thickness
        extent = np.ceil(ends.max(axis=0)).astype(int) + thickness - corner
        mask = np.zeros((extent[1], extent[0]), np.uint8)
        cv2.line(mask, *[tuple(fixed(e - corner).tolist()) for e in ends], 1, thickness,
                 cv2.LINE_8, SUBPIXEL_BITS)
        return Sprite(mask, palette(random_colour(rng)), (int(corner[0]), int(corner[1])))
    mask = np.zeros((size, size), np.uint8)
    if kind == 1:
        axes = (int(size / 2 * rng.uniform(0.3, 1)), int(size / 2 * rng.uniform(0.3, 1)))
        cv2.ellipse(mask, (size // 2, size // 2), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    else:
        cv2.fillPoly(mask, [fixed(rng.uniform(0, size - 1, (rng.integers(3, 7), 2)))], 1,
                     cv2.LINE_8, SUBPIXEL_BITS)
    origin = (int(rng.integers(-size // 2, w - size // 2)), int(rng.integers(-size // 2, h - size // 2)))
    return Sprite(mask, palette(random_colour(rng)), origin)


# ---------------------------------------------------------------------------------- placement

def mask_rows(mask: np.ndarray) -> tuple[int, int]:
    """First and one-past-last row of uint8[h, w] ``mask`` holding any pixel."""
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[0]), int(rows[-1]) + 1


def place_figure(rng: np.random.Generator, sprite: Sprite, image_hw: tuple[int, int],
                 target_x: float, ground_y: float | None) -> None:
    """Set ``sprite.origin`` with the head wholly inside the image and the feet at most 35% of
    the figure below the bottom edge; centre near ``target_x``, soles near ``ground_y`` (or
    anywhere allowed when None)."""
    h, w = image_hw
    hx, hy = sprite.head_centre
    r = sprite.head_radius * HEAD_RY / HEAD_RX
    top, bottom = mask_rows(sprite.mask)
    x_low, x_high = r - hx, w - r - hx
    x = min(max(target_x - sprite.mask.shape[1] / 2, x_low), max(x_low, x_high))
    y_low = r - hy
    y_high = max(y_low, h - bottom + 0.35 * (bottom - top))
    y = rng.uniform(y_low, y_high) if ground_y is None else min(max(ground_y - bottom, y_low), y_high)
    sprite.origin = (int(round(x)), int(round(y)))


def place_upright(rng: np.random.Generator, sprite: Sprite, image_hw: tuple[int, int]) -> None:
    """Set ``sprite.origin`` with its centre column inside the image and its top at most 20%,
    its bottom at most 30% of its height outside."""
    h, w = image_hw
    mh, mw = sprite.mask.shape
    x = rng.uniform(-mw / 2, w - mw / 2)
    y_low, y_high = -0.2 * mh, h - 0.7 * mh
    sprite.origin = (int(x), int(rng.uniform(min(y_low, y_high), max(y_low, y_high))))


# -------------------------------------------------------------------------------------- scene

def sample_image_size(rng: np.random.Generator, config: SyntheticConfig) -> tuple[int, int]:
    """(height, width): a strip, a small image, or each side uniform in the usual range."""
    u = rng.random()
    if u < config.strip_image_prob:
        long_side, short_side = int(rng.integers(600, 1001)), int(rng.integers(150, 261))
        return (short_side, long_side) if rng.random() < 0.75 else (long_side, short_side)
    if u < config.strip_image_prob + config.small_image_prob:
        long_side = int(rng.integers(*config.small_image_long_side, endpoint=True))
        short_side = int(long_side * rng.uniform(0.5, 1.0))
        return (short_side, long_side) if rng.random() < 0.5 else (long_side, short_side)
    return (int(rng.integers(*config.image_side_range, endpoint=True)),
            int(rng.integers(*config.image_side_range, endpoint=True)))


def person_sprites(rng: np.random.Generator, image_hw: tuple[int, int], config: SyntheticConfig,
                   mannequin: bool, count: int | None) -> list[Sprite]:
    """Placed figures of one scene scale (``count`` of them, or as many as the scale draws),
    each annotated as its own target (persons) or not (mannequins)."""
    h, w = image_hw
    scales = config.scene_scales
    _, low, high, most = scales[weighted_index(rng, [s[0] for s in scales])]
    min_height = config.min_mannequin_height if mannequin else config.min_person_height
    low = max(low * h, min_height)
    high = max(high * h, low)
    typical = log_uniform(rng, low, high)
    count = int(rng.integers(1, most + 1)) if count is None else count
    group = count > 1 and rng.random() < config.group_prob
    group_x, ground_y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.6, 1.05) * h
    spacing = typical * rng.uniform(0.2, 0.5)
    sprites = []
    for i in range(count):
        height = float(np.clip(typical * math.exp(rng.normal(0, 0.15)), min_height, high))
        sprite = figure_sprite(rng, height, mannequin)
        if group:
            target_x = group_x + (i - (count - 1) / 2) * spacing + rng.normal(0, 0.05 * typical)
            place_figure(rng, sprite, image_hw, target_x, ground_y + rng.normal(0, 0.03 * typical))
        else:
            place_figure(rng, sprite, image_hw, rng.uniform(0, w), None)
        sprites.append(sprite)
    return sprites


def crowd_sprites(rng: np.random.Generator, image_hw: tuple[int, int],
                  config: SyntheticConfig) -> list[Sprite]:
    """A dense cluster of tiny persons in rows, back rows first; all share one target."""
    h, w = image_hw
    base = rng.uniform(*config.crowd_figure_height)
    count = int(rng.integers(*config.crowd_count, endpoint=True))
    per_row = max(3, int(rng.uniform(8, 20)))
    width = min(w * 0.9, per_row * base * 0.3)
    left, ground = rng.uniform(0, w - width), rng.uniform(1.2 * base, h)
    sprites = []
    for i in range(count):
        row = i // per_row
        sprite = figure_sprite(rng, base * rng.uniform(0.85, 1.15), mannequin=False)
        foot_y = ground - (count // per_row - row) * 0.3 * base + rng.uniform(0, 0.1 * base)
        bottom = mask_rows(sprite.mask)[1]
        x = left + rng.uniform(0, width) - sprite.mask.shape[1] / 2
        sprite.origin = (int(round(x)), int(round(foot_y - bottom)))
        sprites.append(sprite)
    return sprites


def scene_sprites(rng: np.random.Generator, image_hw: tuple[int, int],
                  config: SyntheticConfig) -> tuple[list[Sprite], list[bool]]:
    """All sprites of one image in painting order, and per target whether it is a crowd."""
    h, w = image_hw
    has_persons = rng.random() >= config.person_free_prob
    crowd = crowd_sprites(rng, image_hw, config) if has_persons and rng.random() < config.crowd_prob else []
    persons = person_sprites(rng, image_hw, config, False, None) if has_persons else []
    mannequins = person_sprites(rng, image_hw, config, True, capped_poisson(rng, config.mean_mannequins))
    objects = []
    for _ in range(capped_poisson(rng, config.mean_objects)):
        sprite = object_sprite(rng, log_uniform(rng, 16, max(17, 0.9 * h)))
        place_upright(rng, sprite, image_hw)
        objects.append(sprite)
    clutter = [clutter_sprite(rng, image_hw) for _ in range(capped_poisson(rng, config.mean_clutter))]

    crowd_flags = [True] * bool(crowd) + [False] * len(persons)
    for sprite in crowd:
        sprite.target = 0
    for i, sprite in enumerate(persons, start=len(crowd_flags) - len(persons)):
        sprite.target = i
    # Painter's order: lower soles are nearer and painted later; clutter at random depths.
    standing = persons + mannequins + objects
    depth = [s.origin[1] + mask_rows(s.mask)[1] for s in standing]
    depth += list(rng.uniform(0, 1.3 * h, len(clutter)))
    order = np.argsort(depth, kind="stable")
    return crowd + [(standing + clutter)[i] for i in order], crowd_flags


# --------------------------------------------------------------------------- background, light

def ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32[h, w] in [0, 1] rising linearly along a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    x = np.linspace(0, math.cos(angle), w, dtype=np.float32)
    y = np.linspace(0, math.sin(angle), h, dtype=np.float32)
    x, y = x - x.min(), y - y.min()
    scale = 1 / max(float(x.max() + y.max()), 1e-6)
    return (x * scale)[None, :] + (y * scale)[:, None]


def blend_table(c0: np.ndarray, c1: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """uint8[1, 256, 3] cv2.LUT table: entry i = c0 + weights[i] * (c1 - c0), BGR."""
    table = c0 + weights[:, None] * (c1 - c0)
    return np.clip(table, 0, 255).astype(np.uint8)[None]


def colour_lookup(index: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8[h, w] indices → uint8[h, w, 3] through a uint8[1, 256, 3] table."""
    return cv2.LUT(cv2.merge([index, index, index]), table)


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8[h, w, 3] BGR: a gradient, smooth noise, stripes, tiles or blurred blobs."""
    kind = rng.integers(5)
    c0, c1 = random_colour(rng), random_colour(rng)
    if kind == 0:
        index = (ramp(rng, h, w) * 255).astype(np.uint8)
        return colour_lookup(index, blend_table(c0, c1, np.linspace(0, 1, 256)))
    if kind == 1:
        grid = rng.integers(2, 9, 2)
        cells = c0 + rng.uniform(-60, 60, (grid[0], grid[1], 3))
        return cv2.resize(np.clip(cells, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == 2:  # 3 to 30 periods across the image; the uint8 cast wraps at each period
        phase = (ramp(rng, h, w) * (256 * rng.uniform(3, 30))).astype(np.int32).astype(np.uint8)
        wave = np.sin(np.arange(256) * (2 * np.pi / 256)) * 0.5 + 0.5
        wave = wave if rng.random() < 0.5 else (wave > 0.5).astype(float)
        return colour_lookup(phase, blend_table(c0, c1, wave))
    if kind == 3:
        tile = int(rng.integers(8, 80))
        cells = c0 + rng.uniform(-40, 40, (h // tile + 1, w // tile + 1, 3))
        image = cv2.resize(np.clip(cells, 0, 255).astype(np.uint8), None, fx=tile, fy=tile,
                           interpolation=cv2.INTER_NEAREST)[:h, :w].copy()
        image[::tile], image[:, ::tile] = c1.astype(np.uint8), c1.astype(np.uint8)
        return image
    small = np.empty((max(h // 8, 2), max(w // 8, 2), 3), np.uint8)
    small[:] = c0.astype(np.uint8)
    for _ in range(rng.integers(3, 12)):
        centre = (int(rng.integers(small.shape[1])), int(rng.integers(small.shape[0])))
        axes = (int(rng.integers(1, small.shape[1] // 2 + 2)), int(rng.integers(1, small.shape[0] // 2 + 2)))
        cv2.ellipse(small, centre, axes, rng.uniform(0, 180), 0, 360, random_colour(rng).tolist(), -1)
    return cv2.resize(cv2.GaussianBlur(small, (0, 0), 2), (w, h), interpolation=cv2.INTER_LINEAR)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8[h, w, 3] BGR: one texture, or half the time a second one below a horizon."""
    image = texture(rng, h, w)
    if rng.random() < 0.5:
        horizon = int(h * rng.uniform(0.3, 0.8))
        image[horizon:] = texture(rng, h - horizon, w)
    return image


def light_and_camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] → same: overall gain 0.55–1.35 falling off along a random direction,
    a slight colour cast (±7% per channel), half the time sensor noise (std 1.5–6 levels),
    sometimes a slight blur."""
    h, w = image.shape[:2]
    falloff = 1 + rng.uniform(-0.4, 0.4) * (ramp(rng, 8, 8) - 0.5)
    gain = rng.uniform(0.55, 1.35) * falloff[..., None] * rng.uniform(0.93, 1.07, 3)
    gain_map = cv2.resize((gain * GAIN_ONE).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    lit = cv2.multiply(image, gain_map, scale=1 / GAIN_ONE)
    if rng.random() < 0.5:  # uniform noise: bytes in [0, 255] have mean 127.5 and std 73.9
        noise = np.frombuffer(rng.bytes(h * w * 3), np.uint8).reshape(h, w, 3)
        amplitude = rng.uniform(0.02, 0.08)
        lit = cv2.addWeighted(lit, 1.0, noise, amplitude, -127.5 * amplitude)
    if rng.random() < 0.25:
        lit = cv2.GaussianBlur(lit, (0, 0), rng.uniform(0.5, 1.2))
    return lit


# --------------------------------------------------------------------------------- annotation

def paint(image: np.ndarray, labels: np.ndarray, sprite: Sprite, layer: int
          ) -> tuple[tuple[int, int, int, int] | None, int]:
    """Paint ``sprite`` onto uint8[H, W, 3] ``image`` and its ``layer`` id onto uint16[H, W]
    ``labels``. Returns the tight (x0, y0, x1, y1) box (x1, y1 exclusive) of its pixels inside
    the image, or None, and how many pixels that is."""
    h, w = labels.shape
    x0, y0 = sprite.origin
    mh, mw = sprite.mask.shape
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + mw, w), min(y0 + mh, h)
    if ix0 >= ix1 or iy0 >= iy1:
        return None, 0
    parts = sprite.mask[iy0 - y0: iy1 - y0, ix0 - x0: ix1 - x0]
    count = cv2.countNonZero(parts)
    if count == 0:
        return None, 0
    colours = cv2.LUT(cv2.merge([parts, parts, parts]), sprite.palette)
    cv2.copyTo(colours, parts, image[iy0:iy1, ix0:ix1])  # in place: the slice is a view
    np.copyto(labels[iy0:iy1, ix0:ix1], layer, where=parts > 0)
    x, y, bw, bh = cv2.boundingRect(parts)
    return (ix0 + x, iy0 + y, ix0 + x + bw, iy0 + y + bh), count


def annotation(box: tuple[int, int, int, int], area: int, iscrowd: bool) -> dict:
    """COCO person annotation (without ids) for an (x0, y0, x1, y1) pixel box."""
    x0, y0, x1, y1 = box
    return {"category_id": 1, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(area), "iscrowd": int(iscrowd), "num_keypoints": 0, "keypoints": [],
            "segmentation": []}


def image_rng(seed: int, split: str, image_id: int) -> np.random.Generator:
    """The random stream of one image: a function of (seed, split, image id) only."""
    return np.random.default_rng([seed, SPLIT_CODES[split], image_id])


def render_image(rng: np.random.Generator, config: SyntheticConfig = SyntheticConfig()) -> Rendering:
    """Draw one image and its annotations from ``rng`` (see :func:`image_rng`)."""
    h, w = sample_image_size(rng, config)
    image = background(rng, h, w)
    sprites, crowd_flags = scene_sprites(rng, (h, w), config)
    labels = np.zeros((h, w), np.uint16)
    boxes, drawn = [], np.zeros(len(sprites) + 1, np.int64)
    for layer, sprite in enumerate(sprites, start=1):
        box, drawn[layer] = paint(image, labels, sprite, layer)
        boxes.append(box)
    visible = np.bincount(labels.ravel(), minlength=len(sprites) + 1)

    annotations, heads = [], []
    for target, is_crowd in enumerate(crowd_flags):
        layers = [i for i, s in enumerate(sprites, start=1) if s.target == target]
        target_boxes = np.array([boxes[i - 1] for i in layers if boxes[i - 1] is not None])
        seen, total = int(visible[layers].sum()), int(drawn[layers].sum())
        if seen == 0:
            continue
        box = (*target_boxes[:, :2].min(axis=0), *target_boxes[:, 2:].max(axis=0))
        hidden = 1 - seen / total > config.max_hidden_fraction
        annotations.append(annotation(tuple(int(v) for v in box), seen, is_crowd or hidden))
    for layer, sprite in enumerate(sprites, start=1):
        if sprite.head_centre is None:
            continue
        x = round(sprite.origin[0] + sprite.head_centre[0])  # cv2 draws pixel centres at integers
        y = round(sprite.origin[1] + sprite.head_centre[1])
        inside = 0 <= x < w and 0 <= y < h
        heads.append(Head((x, y), sprite.head_radius, sprite.is_person,
                          inside and int(labels[y, x]) == layer))
    return Rendering(light_and_camera(rng, image), annotations, heads)


# --------------------------------------------------------------------------------- the dataset

def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """uint8[H, W, 3] BGR → JPEG bytes."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RtmbenchError("OpenCV could not encode a JPEG")
    return data.tobytes()


def write_image(image_dir: Path, seed: int, split: str, image_id: int,
                config: SyntheticConfig) -> tuple[dict, list[dict]]:
    """Render and write one image; return its COCO image entry and annotations (no ids)."""
    rng = image_rng(seed, split, image_id)
    rendering = render_image(rng, config)
    quality = int(rng.integers(*config.jpeg_quality, endpoint=True))
    file_name = f"{image_id:012d}.jpg"
    (image_dir / file_name).write_bytes(encode_jpeg(rendering.image, quality))
    h, w = rendering.image.shape[:2]
    return {"id": image_id, "file_name": file_name, "width": w, "height": h}, rendering.annotations


def generate(out: Path, seed: int, num_images: int, split: str = "val", progress: bool = True,
             config: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write ``out/images/<split>2017/<id:012d>.jpg`` (ids 1..num_images) and, last and
    atomically, ``out/annotations/person_keypoints_<split>2017.json``; return the latter."""
    if split not in SPLIT_CODES:
        raise RtmbenchError(f"unknown split {split!r}: expected one of {', '.join(SPLIT_CODES)}")
    if num_images < 1:
        raise RtmbenchError(f"--num-images must be at least 1, got {num_images}")
    if seed < 0:
        raise RtmbenchError(f"--seed must be non-negative, got {seed}")
    out = Path(out)
    ann_path = out / "annotations" / f"person_keypoints_{split}2017.json"
    ann_path.unlink(missing_ok=True)
    image_dir = out / "images" / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for image_id in tqdm(range(1, num_images + 1), desc=f"make-data {split}", unit="img",
                         disable=not progress):
        entry, anns = write_image(image_dir, seed, split, image_id, config)
        images.append(entry)
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})

    info = {"description": "rtmbench synthetic person detection", "version": str(GENERATOR_VERSION),
            "seed": seed, "split": split, "num_images": num_images,
            "config": dataclasses.asdict(config)}
    coco = {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": CATEGORIES}
    write_bytes_atomic(ann_path, json.dumps(coco, separators=(",", ":")).encode())
    log.info("wrote %d images, %d annotations to %s", len(images), len(annotations), out)
    return ann_path
