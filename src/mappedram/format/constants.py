"""QEMU-named constants of the migration stream, to be reviewed against QEMU line by line.

References:
    QEMU migration/savevm.h (QEMU_VM_* section types, MIG_CMD_*),
    migration/savevm.c (QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION),
    migration/ram.h and ram.c (RAM_SAVE_FLAG_*, MappedRamHeader,
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT, MAPPED_RAM_LOAD_BUF_SIZE),
    docs/devel/migration/mapped-ram.rst.
"""

from __future__ import annotations

__all__ = [
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "QEMU_VM_FILE_VERSION_COMPAT",
    "QEMU_VM_EOF",
    "QEMU_VM_SECTION_START",
    "QEMU_VM_SECTION_PART",
    "QEMU_VM_SECTION_END",
    "QEMU_VM_SECTION_FULL",
    "QEMU_VM_SUBSECTION",
    "QEMU_VM_VMDESCRIPTION",
    "QEMU_VM_CONFIGURATION",
    "QEMU_VM_COMMAND",
    "QEMU_VM_SECTION_FOOTER",
    "SECTION_NAMES",
    "MIG_CMD_SWITCHOVER_START",
    "RAM_SAVE_FLAG_FULL",
    "RAM_SAVE_FLAG_ZERO",
    "RAM_SAVE_FLAG_MEM_SIZE",
    "RAM_SAVE_FLAG_PAGE",
    "RAM_SAVE_FLAG_EOS",
    "RAM_SAVE_FLAG_CONTINUE",
    "RAM_SAVE_FLAG_XBZRLE",
    "RAM_SAVE_FLAG_HOOK",
    "RAM_SAVE_FLAG_COMPRESS_PAGE",
    "RAM_SAVE_FLAG_MULTIFD_FLUSH",
    "RAM_SAVE_FLAG_NAMES",
    "RAM_SECTION_IDSTR",
    "RAM_SECTION_VERSION_ID",
    "MAPPED_RAM_HDR_VERSION",
    "MAPPED_RAM_FILE_OFFSET_ALIGNMENT",
    "MAPPED_RAM_LOAD_BUF_SIZE",
    "TARGET_PAGE_SIZE",
    "TARGET_PAGE_BITS",
    "VALIDATED_CAPABILITIES",
    "CAP_MAPPED_RAM",
    "CAP_X_IGNORE_SHARED",
    "CAP_MAPPEDRAM_ZSTD",
    "CAP_MAPPEDRAM_CHILD",
    "STREAM_CAPABILITIES",
    "MAPPEDRAM_ZSTD_HDR_VERSION",
]

# migration/savevm.c
QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002  # "SaveVM v2 format is obsolete"
QEMU_VM_FILE_VERSION = 0x00000003

# migration/savevm.h: section type bytes
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

SECTION_NAMES: dict[int, str] = {
    QEMU_VM_EOF: "EOF",
    QEMU_VM_SECTION_START: "START",
    QEMU_VM_SECTION_PART: "PART",
    QEMU_VM_SECTION_END: "END",
    QEMU_VM_SECTION_FULL: "FULL",
    QEMU_VM_SUBSECTION: "SUBSECTION",
    QEMU_VM_VMDESCRIPTION: "VMDESCRIPTION",
    QEMU_VM_CONFIGURATION: "CONFIGURATION",
    QEMU_VM_COMMAND: "COMMAND",
    QEMU_VM_SECTION_FOOTER: "FOOTER",
}

# migration/savevm.c: enum qemu_vm_cmd; the only command a file migration carries.
MIG_CMD_SWITCHOVER_START = 11

# migration/ram.h: the low bits of the be64 "address + flags" word.
RAM_SAVE_FLAG_FULL = 0x01  # obsolete since 2009
RAM_SAVE_FLAG_ZERO = 0x02  # legacy name COMPRESS
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80  # RDMA only
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100  # removed in 9.1
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

RAM_SAVE_FLAG_NAMES: dict[int, str] = {
    RAM_SAVE_FLAG_FULL: "FULL",
    RAM_SAVE_FLAG_ZERO: "ZERO",
    RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_SAVE_FLAG_PAGE: "PAGE",
    RAM_SAVE_FLAG_EOS: "EOS",
    RAM_SAVE_FLAG_CONTINUE: "CONTINUE",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}

# migration/ram.c: SaveVMHandlers savevm_ram_handlers registered as "ram", version 4.
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION_ID = 4

# migration/ram.c
MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000
MAPPED_RAM_LOAD_BUF_SIZE = 0x100000

# x86: TARGET_PAGE_BITS is 12. Targets with variable page size announce theirs in
# the configuration/target-page-bits subsection.
TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS

# migration/savevm.c: should_validate_capability() — the capabilities listed in the
# configuration/capabilities subsection, in QAPI MigrationCapability enum order.
CAP_X_IGNORE_SHARED = "x-ignore-shared"
CAP_MAPPED_RAM = "mapped-ram"
VALIDATED_CAPABILITIES = (CAP_X_IGNORE_SHARED, CAP_MAPPED_RAM)

# mappedram's own: page regions held as zstd frames (format/zstdseek.py). QEMU refuses a
# stream that names it ("Received unknown capability ..."), before it reads any RAM; its
# block headers carry MAPPEDRAM_ZSTD_HDR_VERSION, which QEMU's mapped_ram_read_header refuses too.
CAP_MAPPEDRAM_ZSTD = "mappedram-zstd"
# mappedram's own: an incremental snapshot (format/chain.py): its bitmap marks the pages it
# changed since its parent, the rest are the parent's. QEMU refuses it the same way.
CAP_MAPPEDRAM_CHILD = "mappedram-child"
#: The capabilities a stream this project reads or writes may list, in the order they are written.
STREAM_CAPABILITIES = (*VALIDATED_CAPABILITIES, CAP_MAPPEDRAM_ZSTD, CAP_MAPPEDRAM_CHILD)
MAPPEDRAM_ZSTD_HDR_VERSION = 0x5A000001
