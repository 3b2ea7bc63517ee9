"""Container images in and out: docker save archives, OCI image layouts and OCI archives.

    digests.py      sha256 digests, verifying readers, chain IDs
    compression.py  plain, gzip and zstd layer blobs, detected by their first bytes
    layout.py       OCI image layouts (a directory, or a tar of one): read and write
    platform.py     platforms (OS/ARCH[/VARIANT]) of multi-platform indexes
    dockerarchive.py  `docker save` archives: read and write
    refs.py         image references (name:tag) of a store, and its config/manifest blobs
    load.py         `imagefs image load`: a source's images into a store, layers reused
    save.py         `imagefs image save`: an image of a store as an OCI layout or docker archive
"""
