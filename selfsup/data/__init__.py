"""Image sources, decoded once into uint8 arrays and cached on disk.

Every source ends up as an ``(N, H, W, 3)`` uint8 array plus int64 labels:

* ``digits`` -- scikit-learn's bundled 8x8 digits (the built-in default, no files needed);
* an image folder ``<root>/{train,test|val}/<class>/<image>``, possibly inside one top folder
  (symbolic links are followed inside ``<root>`` only, never from one split into another; only
  regular files are read);
* a folder without ``train/`` (:mod:`.layouts`): class folders ``<root>/<class>/<image>``, whose
  seeded, stratified hold-out (``holdout``) is the test split, or else every image under it,
  unlabelled; or a ``.txt``/``.csv`` file listing image paths (``path[,label]``);
* a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive of such a folder (read without extracting; a
  member listed twice is refused, and so is an image member that expands to more than 64 MiB,
  ``$SELFSUP_MAX_IMAGE_MB``);
* the CIFAR-10/100 python release (archive or extracted folder), or the names ``cifar10``/``cifar100``;
* the STL-10 binary release (archive or ``stl10_binary/`` folder), or the name ``stl10``.

Everything except ``digits`` is written to ``cache_dir/<name>-<key>/`` as ``.npy`` files and
memory-mapped on later runs, so only the first run pays for decoding. The key covers the
source's path, size and modification times, ``image_size`` and ``skip_corrupt``, so editing the
source or changing those options decodes again.

Resizing (``image_size``) resizes the shorter side to ``image_size`` and crops the centre square,
in one PIL bicubic resampling (antialiased when shrinking). A folder or list of images of
different sizes needs ``image_size``, or ``default_size`` (the trainer's, from the model), which
is used instead. Before decoding digits, a folder, a list, CIFAR or STL-10, the decoded size (with
the path's temporaries) is compared with the memory available (:func:`available_memory`), and
work that cannot fit is refused with the estimate; archives, whose image count is known only once
read, are not checked. Images are turned upright by their EXIF orientation and converted to RGB:
grayscale is replicated, an alpha channel is dropped (not composited), 16-bit grayscale keeps its
top 8 bits, and multi-frame files (GIF, TIFF) use their first frame.

The package, one subsystem per module (each imports only the ones above it):

* :mod:`.datasets` -- ``DataError``, ``ImageDataset``, ``DataSplits``, and ``Decoded``, what a reader returns;
* :mod:`.memory` -- ``available_memory`` and the check that refuses a decode that cannot fit;
* :mod:`.decode` -- ``decode_image``, ``to_rgb``, ``open_regular`` and the parallel ``Decoder``;
* :mod:`.folders` -- file-name rules, ``scan_image_folder`` (symlink-safe) and ``FolderCollector``;
* :mod:`.layouts` -- class folders, unlabelled trees and list files, their hold-out and decoding;
* :mod:`.releases` -- CIFAR-10/100 pickles (a safe unpickler), STL-10 binaries, digits;
* :mod:`.archives` -- reading tar/zip archives member by member, with member limits;
* :mod:`.sources` -- what a path holds (``inspect_source``) and how it is decoded (``decode_source``);
* :mod:`.cache` -- the cache entries: keys, ``meta.json``, writing, opening, removing stale ones;
* :mod:`.download` -- the official archives behind ``cifar10``/``cifar100``/``stl10``, md5-verified;
* :mod:`.load` -- ``load_data``, which ties them together, and ``builtin_image_size``.
"""
from .cache import default_cache_dir
from .datasets import DataError, DataSplits, ImageDataset
from .decode import decode_image, open_regular, to_rgb, upright, worker_init
from .folders import IMAGE_EXTENSIONS, is_hidden_name, is_image_name, scan_image_folder
from .layouts import LIST_SUFFIXES, training_images
from .load import builtin_image_size, load_data
from .memory import available_memory

__all__ = ["DataError", "ImageDataset", "DataSplits", "load_data", "builtin_image_size", "default_cache_dir",
           "IMAGE_EXTENSIONS", "available_memory", "decode_image", "to_rgb", "upright", "open_regular", "worker_init",
           "is_image_name", "is_hidden_name", "scan_image_folder", "LIST_SUFFIXES", "training_images"]
