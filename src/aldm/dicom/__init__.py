"""DICOM in and out (extra `dicom`: pydicom >= 3): hospital archives as they are.

`index` finds the image series in a folder or archive in one pass over the headers, grouped by
SeriesInstanceUID and study; `select` picks the source series of a study; `volume` stacks one
series into a checked (data, affine) volume; `write` writes a derived (synthetic) MR series over
the source's geometry. pydicom is imported only here, when DICOM is used.
"""

from __future__ import annotations

from aldm.errors import require


def pydicom():
    """pydicom, or an AldmError naming the extra that installs it."""
    return require("pydicom", "dicom")
