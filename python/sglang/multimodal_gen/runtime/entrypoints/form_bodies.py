"""Form bodies of ``POST /v1/videos`` read strictly: UTF-8 text only, and whole.

Starlette's parsers are lenient where this API must not be: a multipart value that is not UTF-8
is decoded as Latin-1 (``\\xff\\xfe`` becomes ``ÿþ``), a ``charset`` the client declares is
honoured (``utf-7`` turns ``a+ADw-b`` into ``a<b``), urlencoded ``%FF`` becomes U+FFFD, and a
multipart body cut before its closing boundary loses its last field without a word. Here each of
those is a 400 naming the field. Uploaded files (a part with a ``filename``) are binary and are
not decoded: one is taken, named ``input_reference`` and of at most ``max_file_bytes`` (a 400
naming it past that, while it streams in); the text fields together may hold ``max_field_bytes``
(a 413, as for any body over ``--max-body-bytes``).
"""

from __future__ import annotations

import codecs
from typing import AsyncIterator, Union

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.entrypoints.request_limits import (
    DEFAULT_MAX_IMAGE_BYTES,
    MIB,
    RequestTooLarge,
)
from sglang.multimodal_gen.runtime.entrypoints.video_api import brief, decode_utf8

FILE_FIELD = "input_reference"

FormItems = list[tuple[str, Union[str, UploadFile]]]


def check_charset(content_type: str, what: str) -> None:
    """Refuse a declared ``charset`` other than UTF-8 (``what``: the body or part it is of)."""
    _, options = parse_options_header(content_type)
    declared = options.get(b"charset")
    if declared is None:
        return
    name = declared.decode("latin-1")
    try:
        utf8 = codecs.lookup(name).name == "utf-8"
    except LookupError:
        utf8 = False
    if not utf8:
        raise InvalidRequestError(f"{what} declares charset {brief(name)}; this server reads UTF-8 only")


def parse_urlencoded(raw: bytes) -> FormItems:
    """``a=1&b=caf%C3%A9`` as (name, value) pairs, names and values decoded as UTF-8 only."""
    from urllib.parse import unquote_to_bytes

    items: FormItems = []
    for pair in raw.split(b"&"):
        if not pair.strip():
            continue
        name_bytes, _, value_bytes = pair.partition(b"=")
        name = decode_utf8(unquote_to_bytes(name_bytes.replace(b"+", b" ")), "a form field name")
        root = name.split("[", 1)[0]
        value = decode_utf8(unquote_to_bytes(value_bytes.replace(b"+", b" ")), f"form field {brief(name)}", root)
        items.append((name, value))
    return items


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, with text parts decoded as UTF-8 only and a body that ends
    before its closing boundary refused (python-multipart reports the end only when it sees it).

    Sizes are counted as the parts stream in: the text parts together up to ``max_field_bytes``
    (``--max-body-bytes``: a 413), the one file part, which must be ``input_reference``, up to
    ``max_file_bytes`` (``--max-image-bytes``: a 400 naming it). ``max_files`` stays 1.
    """

    def __init__(self, headers: Headers, stream: AsyncIterator[bytes], *, max_field_bytes: int = MIB,
                 max_file_bytes: int = DEFAULT_MAX_IMAGE_BYTES, **kwargs: int) -> None:
        kwargs.setdefault("max_files", 1)
        kwargs.setdefault("max_part_size", max_field_bytes)
        super().__init__(headers, stream, **kwargs)  # type: ignore[arg-type]
        self._ended = False
        self.max_field_bytes, self.max_file_bytes = max_field_bytes, max_file_bytes
        self._field_bytes = self._file_bytes = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        _, options = parse_options_header(part.content_disposition)
        part.field_name = decode_utf8(options[b"name"], "a multipart field name")
        if part.file is not None and part.field_name != FILE_FIELD:
            raise InvalidRequestError(f"field {brief(part.field_name)} is a file upload; this server takes a file "
                                      f"only as {FILE_FIELD}", param=part.field_name.split("[", 1)[0])
        if part.file is None:
            for header, value in part.item_headers:
                if header == b"content-type":
                    check_charset(value.decode("latin-1"), f"form field {brief(part.field_name)}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is None:
            self._field_bytes += end - start
            if self._field_bytes > self.max_field_bytes:
                raise RequestTooLarge(f"the request body is more than {self.max_field_bytes} bytes besides an "
                                      f"{FILE_FIELD} file; this server takes at most {self.max_field_bytes} bytes "
                                      "of fields (--max-body-bytes)")
        else:
            self._file_bytes += end - start
            if self._file_bytes > self.max_file_bytes:
                raise InvalidRequestError(f"{FILE_FIELD} is more than {self.max_file_bytes} bytes; this server "
                                          f"takes images of at most {self.max_file_bytes} bytes (--max-image-bytes)",
                                          param=FILE_FIELD)
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            super().on_part_end()
            return
        root = part.field_name.split("[", 1)[0]
        self.items.append((part.field_name, decode_utf8(bytes(part.data), f"form field {brief(part.field_name)}",
                                                        root)))

    def on_end(self) -> None:
        self._ended = True

    async def parse(self):  # type: ignore[override]
        check_charset(self.headers.get("content-type", ""), "the multipart body")
        try:
            form = await super().parse()
        except MultiPartException as exc:
            raise InvalidRequestError(f"the multipart body is malformed: {exc.message}") from None
        if not self._ended:
            await form.close()
            raise InvalidRequestError("the multipart body ends before its closing boundary; it was cut off, "
                                      "send it whole")
        return form
