"""mypy holds every kind to the contract here: each registered KIND must be a ``Kind`` of its own settings and
``Restorable``. Nothing imports this module at run time; ``make lint`` type-checks it."""

from __future__ import annotations

from kinds.couchdb.kind import KIND as COUCHDB
from kinds.couchdb.plan import Settings as CouchdbSettings
from kinds.datastore.exports import KIND as DATASTORE
from kinds.datastore.plan import Settings as DatastoreSettings
from kinds.directory.kind import KIND as DIRECTORY
from kinds.directory.plan import Settings as DirectorySettings
from kinds.disks.plan import DiskSettings
from kinds.disks.snapshots import KIND as DISKS
from kinds.filestore.backups import KIND as FILESTORE
from kinds.filestore.plan import FilestoreSettings
from kinds.sqlsync.kind import KIND as SQLSYNC
from kinds.sqlsync.plan import Settings as SqlSyncSettings
from services.kinds import Kind, Restorable

_DATASTORE: Kind[DatastoreSettings] = DATASTORE
_DATASTORE_DRILLS: Restorable[DatastoreSettings] = DATASTORE
_DISKS: Kind[DiskSettings] = DISKS
_DISKS_DRILLS: Restorable[DiskSettings] = DISKS
_FILESTORE: Kind[FilestoreSettings] = FILESTORE
_FILESTORE_DRILLS: Restorable[FilestoreSettings] = FILESTORE
_DIRECTORY: Kind[DirectorySettings] = DIRECTORY
_DIRECTORY_DRILLS: Restorable[DirectorySettings] = DIRECTORY
_COUCHDB: Kind[CouchdbSettings] = COUCHDB
_COUCHDB_DRILLS: Restorable[CouchdbSettings] = COUCHDB
_SQLSYNC: Kind[SqlSyncSettings] = SQLSYNC
_SQLSYNC_DRILLS: Restorable[SqlSyncSettings] = SQLSYNC
