"""The datastore as a filesystem (pyfuse3).

Modules, in the order a request passes through them:

- ``ops``        the pyfuse3.Operations adapter: requests in, node calls, errnos and attributes out
- ``namespace``  inode number -> node; image incarnations, their trees and the one cache
- ``inodes``     the inode-numbering scheme
- ``nodes``      what each file and directory is (stores, images, trees, synthetic files)
- ``files``      open handles: image files, small generated files, exports, directory snapshots
- ``prefetch``   read-around of image files into the kernel's page cache
- ``imports``  import/<new-id>: a tar written into the mount becomes a new layer
- ``exports``  export/<ancestor>.tar: a layer diff streamed out as a file
- ``holders``  whether any process still holds an import file open (commit-at-last-close)
- ``names``    parsing export file names (ancestor, filter spec, headers-only)
- ``options``  mount options
- ``mount``    lifecycle: mount, daemonize, signals, unmount; ``helper`` for mount(8)
"""
