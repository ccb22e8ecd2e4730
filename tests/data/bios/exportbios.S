/*
 * A tiny x86 firmware for the export tests: the last 4 KiB of a BIOS image
 * (guest-physical 0xfffff000-0xffffffff). From the reset vector it
 *   1. programs the host bridge (i440FX 8086:1237 or q35 MCH 8086:29c0):
 *      PAM segments to a mix of PCI, read-only, write-only and RAM modes,
 *      and on q35 also SMRAM (D_OPEN, G_SMRAME), ESMRAMC (H_SMRAME, 1 MiB TSEG)
 *      and F_SMBASE (queried, then locked), so that the guest-physical map differs from reset;
 *   2. enters long mode with identity-mapped 2 MiB pages for the low 4 GiB
 *      (page tables at 0x1000-0x6fff);
 *   3. loads known values into every general register, FS/GS base and
 *      KERNEL_GS_BASE, sets CF and DF, and halts with interrupts off.
 * It never uses a stack and never runs from the legacy window, whose
 * mapping it changes. Build: ./build.sh (GNU as and objcopy).
 */
    .set ROM_BASE, 0xfffff000
    .set CS_OFF, 0xf000          /* ROM_BASE - the reset CS base 0xffff0000 */

.macro PCIW reg, val
    mov $(0x80000000 | (\reg & 0xfc)), %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $(0xcfc + (\reg & 3)), %dx
    mov $\val, %al
    out %al, %dx
.endm

.macro SETMSR msr, hi, lo
    mov $\msr, %ecx
    mov $\hi, %edx
    mov $\lo, %eax
    wrmsr
.endm

    .text
    .code16
rom_start:
start16:
    cli
    cld
    lgdtl %cs:(CS_OFF + gdt_desc - rom_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(ROM_BASE + pm32 - rom_start)

    .code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x80000000, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    shr $16, %eax
    cmp $0x29c0, %ax
    je q35

i440fx:                          /* PAM0 at 0x59 */
    PCIW 0x59, 0x30              /* f0000: RAM */
    PCIW 0x5a, 0x03              /* c0000: RAM,       c4000: PCI */
    PCIW 0x5b, 0x21              /* c8000: read-only, cc000: write-only */
    PCIW 0x5c, 0x00              /* d0000, d4000: PCI */
    PCIW 0x5d, 0x30              /* d8000: PCI,       dc000: RAM */
    PCIW 0x5e, 0x03              /* e0000: RAM,       e4000: PCI */
    PCIW 0x5f, 0x10              /* e8000: PCI,       ec000: read-only */
    jmp paging

q35:                             /* PAM0 at 0x90 */
    PCIW 0x90, 0x30
    PCIW 0x91, 0x03
    PCIW 0x92, 0x21
    PCIW 0x93, 0x00
    PCIW 0x94, 0x30
    PCIW 0x95, 0x03
    PCIW 0x96, 0x10
    PCIW 0x9e, 0x81              /* ESMRAMC: H_SMRAME, TSEG 1 MiB, T_EN */
    PCIW 0x9d, 0x48              /* SMRAM: D_OPEN, G_SMRAME */
    PCIW 0x9c, 0xff              /* F_SMBASE: query (the answer is IN_RAM) ... */
    PCIW 0x9c, 0x02              /* ... then lock: the SMBASE window becomes a blackhole */

paging:
    mov $0x1000, %edi            /* clear 0x1000-0x6fff */
    xor %eax, %eax
    mov $(0x6000 / 4), %ecx
    rep stosl
    movl $0x2003, 0x1000         /* PML4[0] -> PDPT */
    movl $0x3003, 0x2000         /* PDPT[0..3] -> 4 page directories */
    movl $0x4003, 0x2008
    movl $0x5003, 0x2010
    movl $0x6003, 0x2018
    mov $0x3000, %edi
    mov $0x83, %eax              /* 2 MiB, present, writable */
    mov $2048, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    mov %cr4, %eax
    or $0x20, %eax               /* PAE */
    mov %eax, %cr4
    mov $0x1000, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx        /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax         /* PG */
    mov %eax, %cr0
    ljmp $0x18, $(ROM_BASE + lm64 - rom_start)

    .code64
lm64:
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    SETMSR 0xc0000100, 0x00007f12, 0x34560000      /* FS_BASE */
    SETMSR 0xc0000101, 0xffff8880, 0x00001000      /* GS_BASE */
    SETMSR 0xc0000102, 0xffffffff, 0x81000000      /* KERNEL_GS_BASE */
    movabs $0x1111111111111111, %rax
    movabs $0x2222222222222222, %rcx
    movabs $0x3333333333333333, %rdx
    movabs $0x4444444444444444, %rbx
    movabs $0x5555555555555550, %rsp
    movabs $0x6666666666666666, %rbp
    movabs $0x7777777777777777, %rsi
    movabs $0x8888888888888888, %rdi
    movabs $0x9999999999999999, %r8
    movabs $0xaaaaaaaaaaaaaaaa, %r9
    movabs $0xbbbbbbbbbbbbbbbb, %r10
    movabs $0xcccccccccccccccc, %r11
    movabs $0xdddddddddddddddd, %r12
    movabs $0xeeeeeeeeeeeeeeee, %r13
    movabs $0x0123456789abcdef, %r14
    movabs $0xfedcba9876543210, %r15
    stc
    std
halt:
    hlt
    jmp halt

    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff     /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
    .quad 0x00af9a000000ffff     /* 0x18: 64-bit code */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long ROM_BASE + gdt - rom_start

    .org 0xff0, 0x90
    .code16
reset_vector:                    /* 0xfffffff0; CS base 0xffff0000 */
    jmp start16
    .org 0x1000, 0x90
