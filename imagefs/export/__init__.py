"""Exporting an image as a layer tar: the diff of two sealed trees, filtered and streamed.

    export_diff(new, old, spec=None, data=True) -> iterator of bytes chunks
    diff_changes(new, old) -> [Change]       the same diff as a list (tests, CLI)
"""
from .diff import Change, diff_changes
from .filterspec import (FilterSpec, FilterType, create_filter_spec, decode_filter_spec,
                         encode_filter_spec, format_filter_text, parse_filter_options,
                         parse_filter_text)
from .tarstream import tar_stream


def export_diff(new, old, *, spec=None, data=True):
    """The layer tar that turns ``old`` (None: an empty tree) into ``new``, as bytes chunks.

    Nothing is read until the first chunk is asked for.
    """
    yield from tar_stream(new, diff_changes(new, old), spec=spec, data=data)


__all__ = ["Change", "FilterSpec", "FilterType", "create_filter_spec", "decode_filter_spec",
           "diff_changes", "encode_filter_spec", "export_diff", "format_filter_text",
           "parse_filter_options", "parse_filter_text", "tar_stream"]
