"""Deterministic procedural images of polygon shapes, written in the on-disk layouts of real datasets.

The demo and the tests cannot download ImageNet, CIFAR, VOC or COCO, so this package draws stand-ins that the
real loaders read unchanged. Everything is built from one primitive, :class:`Object`: a class id, a simple
polygon (no holes) in pixel coordinates, its bounding box and its colour. A classification image is one
object; a detection scene (:func:`sample_scene`, shared by the VOC and COCO writers) is several that never
overlap. Because every object is a polygon, COCO polygon masks, areas and VOC
boxes come for free.

Classes are defined by *shape only*: colour, scale, position, aspect, shear, mirroring and a bounded rotation
are random per object, the background is a random gradient or texture, and clutter (line segments and
irregular blobs that are not class shapes) plus pixel noise is added. Some class pairs are deliberately
close (triangle / chevron, semicircle / U, circle / hexagon / pentagon, cross / T / L) so that a larger
network learns measurably better features than a tiny one.

Determinism: every image draws from its own ``numpy`` generator seeded by
``SeedSequence([seed, layout, split, class, index])``, so the bytes of one image do not depend on how many
others were generated, in which order, or in how many processes.

Coordinates: ``x`` to the right, ``y`` down, continuous pixel frame where the canvas spans ``[0, W] x [0, H]``
(pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``). ``bbox`` is ``(x0, y0, x1, y1)`` in that frame.

Modules (each imports only from those above it):

- :mod:`.shapes`: the class shapes and textures, class names, :class:`Object`, :func:`sample_object`;
- :mod:`.rendering`: backgrounds, clutter, textures, :func:`render`, :func:`make_classification_image`,
  :func:`image_rng`, :func:`encode_jpeg`;
- :mod:`.writer`: ``meta.json``, :class:`DatasetMismatchError`, the atomic write, worker pools, shared checks;
- :mod:`.imagefolder`, :mod:`.cifar`, :mod:`.subsets`: the classification layouts and SimCLR subset lists;
- :mod:`.scenes`: detection scenes shared by :mod:`.voc` and :mod:`.coco`.

The public names of every module are re-exported here: ``from pretrain.synthetic import write_voc``.
"""
from .shapes import (CLASS_NAMES, MAX_CLASSES, MAX_ROTATION_DEG, SHAPES, TEXTURES, Color, Object, Size,
                     class_folder_name, class_names, polygon_area, sample_object)
from .rendering import encode_jpeg, image_rng, make_classification_image, render
from .writer import GENERATOR_VERSION, META_FILENAME, DatasetMismatchError
from .imagefolder import imagefolder_meta, write_imagefolder
from .cifar import (CIFAR_COARSE_GROUP, CIFAR_IMAGE_SIZE, cifar_coarse_names, cifar_meta, cifar_sample_order,
                    write_cifar)
from .subsets import write_subset_list
from .scenes import (DIFFICULT_FRACTION, SCENE_SCALE_RANGE, SMALL_OBJECT_PROB, SMALL_SCALE_RANGE, is_difficult,
                     make_detection_image, pixel_box, sample_scene, scene_rng, voc_box)
from .voc import write_voc
from .coco import coco_annotation, write_coco

__all__ = [
    # shapes
    "Size", "Color", "MAX_ROTATION_DEG", "SHAPES", "CLASS_NAMES", "MAX_CLASSES", "TEXTURES", "class_folder_name",
    "class_names", "Object", "polygon_area", "sample_object",
    # rendering
    "render", "make_classification_image", "image_rng", "encode_jpeg",
    # writer
    "GENERATOR_VERSION", "META_FILENAME", "DatasetMismatchError",
    # layouts
    "imagefolder_meta", "write_imagefolder",
    "CIFAR_IMAGE_SIZE", "CIFAR_COARSE_GROUP", "cifar_coarse_names", "cifar_sample_order", "cifar_meta", "write_cifar",
    "write_subset_list",
    "SCENE_SCALE_RANGE", "SMALL_SCALE_RANGE", "SMALL_OBJECT_PROB", "DIFFICULT_FRACTION", "pixel_box", "voc_box",
    "is_difficult", "sample_scene", "make_detection_image", "scene_rng",
    "write_voc",
    "coco_annotation", "write_coco",
]
