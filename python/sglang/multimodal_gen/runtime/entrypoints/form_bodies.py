"""Form bodies of ``POST /v1/videos`` read strictly: UTF-8 text only, and whole.

Starlette's parsers are lenient where this API must not be: a multipart value that is not UTF-8
is decoded as Latin-1 (``\\xff\\xfe`` becomes ``ÿþ``), a ``charset`` the client declares is
honoured (``utf-7`` turns ``a+ADw-b`` into ``a<b``), urlencoded ``%FF`` becomes U+FFFD, and a
multipart body cut before its closing boundary loses its last field without a word. Here each of
those is a 400 naming the field. Uploaded files (a part with a ``filename``) are binary and are
not decoded; ``form_to_fields`` refuses them by name.
"""

from __future__ import annotations

import codecs
from typing import AsyncIterator, Union

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.entrypoints.video_api import brief, decode_utf8

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
    before its closing boundary refused (python-multipart reports the end only when it sees it)."""

    def __init__(self, headers: Headers, stream: AsyncIterator[bytes], **kwargs: int) -> None:
        super().__init__(headers, stream, **kwargs)  # type: ignore[arg-type]
        self._ended = False

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        _, options = parse_options_header(part.content_disposition)
        part.field_name = decode_utf8(options[b"name"], "a multipart field name")
        if part.file is None:
            for header, value in part.item_headers:
                if header == b"content-type":
                    check_charset(value.decode("latin-1"), f"form field {brief(part.field_name)}")

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
