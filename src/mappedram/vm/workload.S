/*
 * The micro-VM's guest program: x86-64 long mode, CPL 3 with IOPL 3 (its OUTs are
 * allowed), interrupts off, no stack, no privilege change ever.
 *
 * Assembled with GNU as into a flat binary loaded at CODE (see tools/build_guest.py);
 * mappedram/vm/guest.py holds the same layout constants; mappedram/vm/workload.py ships the bytes
 * (generated). Every access is to an absolute address or through
 * a register: the code is position independent only in its jumps.
 *
 * 1. Fill: data page p (p = data_first .. data_first + fill_pages - 1, guest-physical
 *    page numbers) gets the qword FILL_TAG ^ p in all its 512 qwords. Every
 *    fill_report pages the number of pages filled so far goes to the status page and
 *    an OUT to PORT_FILL gives the VMM an exit; at the end PORT_FILLED.
 * 2. Redirty loop, i = 0, 1, 2, ...:
 *        z = splitmix64(seed + i)
 *        p = data_first + ((z * data_pages) >> 64)       (multiply-high: uniform, any size)
 *        qwords 0 and 1 of page p = (i, z), in one 16-byte store (cmpxchg16b: general
 *        registers only, so every state between two instructions is in kvm_regs)
 *        checksum += z (mod 2^64)
 *    with splitmix64(x) = mix(x + 0x9e3779b97f4a7c15), mix being SplitMix64's
 *    finaliser. Every `batch` iterations the counter and the checksum go to the
 *    status page, then OUT to PORT_BATCH.
 *
 * Registers in the loop (all of the program's state; nothing lives only in memory):
 *    r8  = i (iterations done)       r9  = checksum (sum of z)
 *    r10 = seed                      r11 = data_pages
 *    r12 = data_first * 4096         r13 = iterations left in this batch
 *    r14 = batch                     rax, rbx, rcx, rdx, rsi, rdi: scratch
 *
 * The VMM may stop the guest at any instruction of the loop (a kick) but the status
 * page's two stores: with its one store per iteration, the labels `stored` (the store
 * done, r8 not yet counted), `summed` (r9 too) and `counted` (r8 too, not r13) say how
 * far the iteration got, so its RAM and registers can be checked (check_guest).
 */
        .intel_syntax noprefix
        .code64

        /* guest-physical layout (mappedram.vm.guest) */
        .equ PARAMS,            0x2000
        .equ STATUS,            0x3000
        .equ CODE,              0x4000

        /* the params page, written by the VMM before the start (little-endian qwords) */
        .equ P_SEED,            0x10
        .equ P_DATA_FIRST,      0x18
        .equ P_DATA_PAGES,      0x20
        .equ P_FILL_PAGES,      0x28
        .equ P_BATCH,           0x30
        .equ P_FILL_TAG,        0x38
        .equ P_FILL_REPORT,     0x40

        /* the status page, written by the guest */
        .equ S_COUNTER,         0x00
        .equ S_CHECKSUM,        0x08
        .equ S_FILL_DONE,       0x10
        .equ S_PHASE,           0x18

        .equ PHASE_FILL,        1
        .equ PHASE_LOOP,        2

        /* I/O ports: each OUT is an exit to the VMM */
        .equ PORT_BATCH,        0xf0
        .equ PORT_FILL,         0xf1
        .equ PORT_FILLED,       0xf2

        /* SplitMix64 (Steele, Lea, Flood 2014; constants as in Vigna's splitmix64.c) */
        .equ GAMMA,             0x9e3779b97f4a7c15
        .equ MIX1,              0xbf58476d1ce4e5b9
        .equ MIX2,              0x94d049bb133111eb

        .text
        .globl _start
_start:
        mov     r10, [PARAMS + P_SEED]
        mov     r11, [PARAMS + P_DATA_PAGES]
        mov     r12, [PARAMS + P_DATA_FIRST]
        shl     r12, 12
        mov     r14, [PARAMS + P_BATCH]
        xor     r8d, r8d
        xor     r9d, r9d

        /* 1. fill */
        mov     qword ptr [STATUS + S_PHASE], PHASE_FILL
        mov     rsi, [PARAMS + P_DATA_FIRST]        /* rsi = page number p */
        mov     rbp, rsi
        add     rbp, [PARAMS + P_FILL_PAGES]        /* rbp = first page not filled */
        mov     r15, [PARAMS + P_FILL_TAG]
        mov     rdi, r12                            /* rdi = address of page p */
        mov     rbx, [PARAMS + P_FILL_REPORT]       /* pages until the next report */
        cld
fill_page:
        cmp     rsi, rbp
        jae     fill_done
        mov     rax, r15
        xor     rax, rsi
        mov     ecx, 512
        rep stosq
        inc     rsi
        dec     rbx
        jnz     fill_page
        mov     rax, rsi
        sub     rax, [PARAMS + P_DATA_FIRST]
        mov     [STATUS + S_FILL_DONE], rax
        out     PORT_FILL, al
        mov     rbx, [PARAMS + P_FILL_REPORT]
        jmp     fill_page
fill_done:
        mov     rax, rsi
        sub     rax, [PARAMS + P_DATA_FIRST]
        mov     [STATUS + S_FILL_DONE], rax
        mov     qword ptr [STATUS + S_PHASE], PHASE_LOOP
        mov     r13, r14
        out     PORT_FILLED, al

        /* 2. redirty loop */
iteration:
        lea     rax, [r10 + r8]                     /* x = seed + i */
        movabs  rcx, GAMMA
        add     rax, rcx
        mov     rcx, rax
        shr     rcx, 30
        xor     rax, rcx
        movabs  rcx, MIX1
        imul    rax, rcx
        mov     rcx, rax
        shr     rcx, 27
        xor     rax, rcx
        movabs  rcx, MIX2
        imul    rax, rcx
        mov     rcx, rax
        shr     rcx, 31
        xor     rax, rcx                            /* rax = z */
        mov     rdi, rax                            /* rdi = z */
        mul     r11                                 /* rdx = (z * data_pages) >> 64 */
        shl     rdx, 12
        lea     rsi, [rdx + r12]                    /* rsi = address of page p */
        mov     rbx, r8                             /* rcx:rbx = (z, i), qwords 1 and 0 to be */
        mov     rcx, rdi
        mov     rax, [rsi]                          /* rdx:rax = what the page holds there */
        mov     rdx, [rsi + 8]
        lock cmpxchg16b [rsi]                       /* equal, so (i, z) is written: the one store */
stored:
        add     r9, rdi
summed:
        inc     r8
counted:
        dec     r13
        jnz     iteration
batch_end:                                          /* a batch done, not yet reported */
        mov     [STATUS + S_COUNTER], r8
        mov     [STATUS + S_CHECKSUM], r9
        mov     r13, r14
        out     PORT_BATCH, al
batch_next:
        jmp     iteration
