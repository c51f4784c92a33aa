"""Small images for the dashboard's pages.

The pages show an item at 96 px (the try-it image at 160 px). Serving the stored file
instead sent a phone photo whole (2-5 MB, 12 MP for the browser to decode) for each of up
to 120 thumbnails on a dataset page, and a TIFF, which browsers do not display, not at
all. A thumbnail is read as the model reads the image (upright, transparency over white;
a JPEG at the smallest DCT scale that covers it: lqf_core.data.open_image), shrunk to fit
a square twice the shown size (for high-density screens), and sent as a PNG when that is
the whole image, else as a JPEG.
"""

from __future__ import annotations

import io

from PIL import Image

from lqf_core.data import ImageSource, open_image

LIST_SIDE = 192  # twice the 96 px of the item lists
TRY_SIDE = 320  # twice the 160 px of the try-it image
JPEG_QUALITY = 85


def thumbnail(source: ImageSource, side: int = LIST_SIDE) -> tuple[bytes, str]:
    """(the encoded thumbnail, its media type); InvalidDataError if it does not decode."""
    image = open_image(source, jpeg_min_size=side)
    out = io.BytesIO()
    if max(image.size) <= side:  # already small: lossless, as it is
        image.save(out, "PNG")
        return out.getvalue(), "image/png"
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "image/jpeg"
