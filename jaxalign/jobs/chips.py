"""Accelerator specifications for the plan's roofline: memory, peak bf16 rate, HBM and ICI bandwidth.

Every figure is the vendor's published per-chip number (``source`` names the page and its table):

* TPU v4 — Cloud TPU docs, "TPU v4", *System architecture* table: 275 TFLOP/s (bf16), 32 GiB HBM2 at
  1200 GB/s. ICI: six links per chip (3D torus) of 50 GB/s each way, from Jouppi et al., "TPU v4: An
  Optically Reconfigurable Supercomputer for Machine Learning with Hardware Support for Embeddings"
  (ISCA 2023), §2 — the least certain figure of the table.
* TPU v5e — Cloud TPU docs, "TPU v6e", *System architecture* table (the v5e column): 197 TFLOP/s,
  16 GB HBM at 819 GB/s, ICI 1600 Gbps. The capacity is taken as 16 GiB: libtpu's compiler reports
  15.75 GiB available on a v5e (its out-of-memory message).
* TPU v5p — Cloud TPU docs, "TPU v5p", *System architecture* table: 459 TFLOP/s, 95 GiB HBM2e ("HBM
  capacity per chip (GiB) 95") at 2765 GB/s, ICI 4800 Gbps (1200 GB/s bidirectional).
* TPU v6e (Trillium) — Cloud TPU docs, "TPU v6e", *System architecture* table: 918 TFLOP/s, 32 GB HBM at
  1600 GB/s, ICI 3200 Gbps (800 GB/s bidirectional).
* H100 SXM — NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOP/s dense bf16 (1979 with sparsity), 80 GB
  HBM3 at 3.35 TB/s, NVLink 900 GB/s (bidirectional).
* H200 SXM — NVIDIA H200 Tensor Core GPU datasheet: 989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s,
  NVLink 900 GB/s.

``ici_bytes_per_s`` is one direction, all links of the chip together (the Gbps figures divided by 8, or
half the bidirectional GB/s): an optimistic rate for a collective that keeps every link busy.
"""

from __future__ import annotations

import dataclasses

from jaxalign.errors import ConfigError

GB = 1e9
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (per-chip figures; rates in units per second)."""

    name: str
    hbm_bytes: float
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    source: str


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 32 * GIB, 275e12, 1200 * GB, 6 * 50 * GB,
         "cloud.google.com/tpu/docs/v4 (System architecture); ICI: Jouppi et al. ISCA 2023 §2"),
    Chip("v5e", 16 * GIB, 197e12, 819 * GB, 1600e9 / 8,
         "cloud.google.com/tpu/docs/v6e (System architecture, v5e column); 16 GiB: libtpu's limit of 15.75 GiB "
         "usable"),
    Chip("v5p", 95 * GIB, 459e12, 2765 * GB, 4800e9 / 8,
         "cloud.google.com/tpu/docs/v5p (System architecture: HBM capacity per chip 95 GiB)"),
    Chip("v6e", 32 * GB, 918e12, 1600 * GB, 3200e9 / 8,
         "cloud.google.com/tpu/docs/v6e (System architecture)"),
    Chip("h100", 80 * GB, 989e12, 3350 * GB, 450 * GB,
         "NVIDIA H100 Tensor Core GPU datasheet (SXM: dense bf16, HBM3, NVLink 900 GB/s bidirectional)"),
    Chip("h200", 141 * GB, 989e12, 4800 * GB, 450 * GB,
         "NVIDIA H200 Tensor Core GPU datasheet (SXM: dense bf16, HBM3e, NVLink 900 GB/s bidirectional)"),
)}

# Substrings of a device's ``device_kind`` -> chip name (checked in order: "v5 lite" before "v5").
_KINDS = (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5p", "v5p"),
          ("tpu v5", "v5p"), ("tpu v4", "v4"), ("h100", "h100"), ("h200", "h200"))


def get(name: str) -> Chip:
    """The chip called ``name`` (``v5p``, ``h100``…); ``ConfigError`` listing the known ones."""
    key = name.lower().strip()
    if key not in CHIPS:
        raise ConfigError(f"--chip: unknown chip {name!r} (known: {', '.join(CHIPS)})")
    return CHIPS[key]


def from_topology(topology: str) -> Chip:
    """The chip of a libtpu topology name such as ``v5p:2x2x1`` or ``v5e:4x4``."""
    return get(topology.split(":", 1)[0].replace("litepod", "e"))


def from_device_kind(kind: str) -> Chip | None:
    """The chip of a JAX ``device.device_kind`` (``"TPU v5 lite"``, ``"NVIDIA H100 80GB HBM3"``), or
    ``None`` for a CPU or an accelerator not in the table."""
    low = kind.lower()
    for sub, name in _KINDS:
        if sub in low:
            return CHIPS[name]
    return None
