"""rpc.py plugin for the pcache SPDK bdev module.

Adds bdev_pcache_create, bdev_pcache_delete, bdev_pcache_get_stats,
bdev_pcache_set_options and bdev_pcache_flush to SPDK's scripts/rpc.py:

    PYTHONPATH=configs/rpc scripts/rpc.py --plugin pcache_rpc bdev_pcache_get_stats

Parameters are passed through unchanged (only those given on the command line), so
the module's own validation and error messages apply.
"""

from spdk.rpc.cmd_parser import print_json


def _params(args, names):
    """The named arguments that were given (None means: not sent)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


_POLICY = ['cache_mode', 'seq_cutoff_kib', 'seq_cutoff_policy', 'write_bypass_kib',
           'promotion']


def _policy_args(p):
    p.add_argument('--cache-mode', dest='cache_mode',
                   help='writeback (default), writethrough, writearound or passthrough '
                        '(kept on the medium)')
    p.add_argument('--seq-cutoff-kib', dest='seq_cutoff_kib', type=int,
                   help='sequential cutoff threshold in KiB, 0 = off (default 1024)')
    p.add_argument('--seq-cutoff-policy', dest='seq_cutoff_policy',
                   help='always, full (default: only when the cache is full) or never')
    p.add_argument('--write-bypass-kib', dest='write_bypass_kib', type=int,
                   help='write-back writes of at least this many KiB go to the base bdev '
                        'while the cache is reclaiming, 0 = off (default 1024)')
    p.add_argument('--promotion', dest='promotion',
                   help='which read misses a full cache caches: always, or second_miss '
                        '(a block on its second recent miss; default)')


def bdev_pcache_create(args):
    params = _params(args, ['name', 'base_bdev_name', 'pmem_path', 'pmem_size_mb',
                            'persistence', 'data_crc', 'gc_percent', 'format', 'huge_pages'] + _POLICY)
    print_json(args.client.call('bdev_pcache_create', params))


def bdev_pcache_delete(args):
    print_json(args.client.call('bdev_pcache_delete', _params(args, ['name', 'flush'])))


def bdev_pcache_get_stats(args):
    print_json(args.client.call('bdev_pcache_get_stats', _params(args, ['name'])))


def bdev_pcache_set_options(args):
    params = _params(args, ['name', 'gc_percent'] + _POLICY)
    print_json(args.client.call('bdev_pcache_set_options', params))


def bdev_pcache_flush(args):
    print_json(args.client.call('bdev_pcache_flush', _params(args, ['name'])))


def spdk_rpc_plugin_initialize(subparsers):
    p = subparsers.add_parser('bdev_pcache_create',
                              help='Create a pcache bdev: a pmem write-back cache over a base bdev')
    p.add_argument('-n', '--name', required=True, help='name of the new bdev')
    p.add_argument('-b', '--base-bdev-name', dest='base_bdev_name', required=True,
                   help='base bdev (waited for if it does not exist yet)')
    p.add_argument('-p', '--pmem-path', dest='pmem_path', required=True,
                   help='medium: DAX file, device-dax, or a file in /dev/shm (volatile)')
    p.add_argument('-s', '--pmem-size-mb', dest='pmem_size_mb', type=int,
                   help='create or size a regular file of this many MiB')
    p.add_argument('--persistence', help='pmem (default; needs DAX) or volatile')
    p.add_argument('--data-crc', dest='data_crc', action='store_true', default=None,
                   help='checksum cached data (only when formatting)')
    p.add_argument('--gc-percent', dest='gc_percent', type=int,
                   help='segment usage at which GC starts, 0..95 (default 95)')
    p.add_argument('--format', action='store_true', default=None,
                   help='format the medium anew, discarding what it holds')
    p.add_argument('--no-huge-pages', dest='huge_pages', action='store_false', default=None,
                   help='keep 4 KiB pages for a medium in RAM (default: rebuilt into '
                        '2 MiB pages, the first 2 GiB during the call)')
    _policy_args(p)
    p.set_defaults(func=bdev_pcache_create)

    p = subparsers.add_parser('bdev_pcache_delete', help='Delete a pcache bdev')
    p.add_argument('name', help='pcache bdev name')
    p.add_argument('--flush', action='store_true', default=None,
                   help='write back all dirty data before deleting')
    p.set_defaults(func=bdev_pcache_delete)

    p = subparsers.add_parser('bdev_pcache_get_stats',
                              help='Statistics of pcache bdevs (all, or one)')
    p.add_argument('-n', '--name', help='pcache bdev name')
    p.set_defaults(func=bdev_pcache_get_stats)

    p = subparsers.add_parser('bdev_pcache_set_options', help='Change options of a pcache bdev')
    p.add_argument('name', help='pcache bdev name')
    p.add_argument('--gc-percent', dest='gc_percent', type=int,
                   help='segment usage at which GC starts, 0..95')
    _policy_args(p)
    p.set_defaults(func=bdev_pcache_set_options)

    p = subparsers.add_parser('bdev_pcache_flush',
                              help='Start writing back all dirty data (progress in get_stats)')
    p.add_argument('name', help='pcache bdev name')
    p.set_defaults(func=bdev_pcache_flush)
