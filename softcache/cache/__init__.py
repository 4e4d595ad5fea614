"""The cache format and its I/O, no model code: a cache can be opened, checked and read with this
package alone (it never imports torch).

``location`` where a store is (one object per URL: filesystem, remote, read-only, timeouts) ·
``manifest`` what a cache holds · ``layout`` its arrays and their encoding · ``guard`` every
read, and opening the root group · ``store`` creating, writing and reading a cache · ``writer``
the background chunk writer · ``shards`` sharded builds and finalizing · ``lock`` who is building
· ``check`` the one integrity checker and ``validate`` · ``summary`` what ``inspect`` reports ·
``trust`` which recorded SPECs may run · ``sign`` signatures."""
