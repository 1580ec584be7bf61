/*
 * testguest CPL0 core (AT&T syntax, assembled through global_asm! in cpl0.rs).
 *
 * On the development host every CPL0 instruction is emulated and the
 * emulator rejects SSE, cmpxchg16b, xsave/xrstor, int3, popcnt, clac and
 * fwait, so this file is plain integer code, kept short, and never calls
 * Rust. Everything it needs is static: the GDT, the per-CPU TSSs, the IDT
 * and the identity page tables are assembled as data, so booting costs a
 * few dozen emulated instructions and no loops.
 *
 * Layout of the work:
 *   _start         BSP entry (Linux 64-bit boot protocol, RSI = boot_params)
 *   tg_pvh_start   BSP entry for PVH loaders (QEMU): 32-bit, paging off,
 *                  EBX = hvm_start_info; builds a boot_params, then _start
 *   tg_ap16_*      AP trampoline, copied to 0x1000 by the CPL3 body (16-bit)
 *   tg_ap32        AP protected-mode step (in place in the image)
 *   tg_long32      protected mode -> long mode (APs and the PVH entry)
 *   tg_ap64        AP long-mode entry
 *   tg_enter_cpl3  common: CR0/CR4, IDT, TSS, iretq into the Rust body
 *   tg_isr_*       256 interrupt stubs and the common handler: services
 *                  (ud2 from CPL3 with a magic in RAX), device interrupts,
 *                  #GP of CPL3 port I/O the TSS I/O bitmap refused (IOPL
 *                  < 3: `ioport=bitmap`), and the crash path for the rest.
 *
 * Constants come from cpl0.rs as global_asm! const operands.
 */

    .set KCODE, 0x08
    .set KDATA, 0x10
    .set UDATA, 0x1b
    .set UCODE, 0x23
    .set KCODE32, 0x28
    .set TSS_SEL0, 0x30
    .set TSS_SIZE, 256
    .set MAX_CPUS, {MAX_CPUS}
    .set KSTACK_SIZE, {KSTACK_SIZE}
    .set BSP_USTACK_SIZE, {BSP_USTACK_SIZE}
    .set AP_USTACK_SIZE, {AP_USTACK_SIZE}
    .set SVC_MAGIC, {SVC_MAGIC}
    .set SVC_WAIT, {SVC_WAIT}
    .set SVC_HALT, {SVC_HALT}
    .set SVC_TRIPLEFAULT, {SVC_TRIPLEFAULT}
    .set SVC_STR, {SVC_STR}
    .set SVC_IOPL, {SVC_IOPL}
    .set RFLAGS_IOPL, 0x3000
    .set SPURIOUS_VECTOR, {SPURIOUS_VECTOR}
    .set LAPIC_EOI, 0xfee000b0
    .set CR4_BITS, 0x620            /* PAE | OSFXSR | OSXMMEXCPT; no SMEP/SMAP */
    .set CR0_CLEAR, 0x6000000c      /* CD | NW | TS | EM */
    .set CR0_SET, 0x22              /* MP | NE */
    .set USER_RFLAGS, 0x3002        /* IOPL=3, IF=0 */
    .set I8042_STATUS, 0x64
    .set BOOT_PARAMS, 0x7000        /* where the Linux entry finds it too */
    .set BP_EXT_CMD_LINE_PTR, 0x0c8 /* boot_params fields bootinfo.rs reads */
    .set BP_E820_ENTRIES, 0x1e8
    .set BP_CMD_LINE_PTR, 0x228
    .set BP_E820_TABLE, 0x2d0
    .set E820_MAX, 128              /* entries that fit in boot_params */
    .set PVH_MAGIC, 0x336ec578      /* hvm_start_info.magic */
    .set XEN_ELFNOTE_PHYS32_ENTRY, 18

/* ------------------------------------------------------------------ */
    .section .text.cpl0, "ax", @progbits
    .code64
    .globl _start
_start:
    cli
    cld
    lgdt tg_gdtr(%rip)
    mov $KDATA, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    lea tg_pml4(%rip), %rax
    mov %rax, %cr3
    lea tg_kstacks+KSTACK_SIZE(%rip), %rsp
    pushq $KCODE                     /* reload CS from our GDT */
    lea 1f(%rip), %rax
    push %rax
    lretq
1:
    mov %rsi, %rdi                   /* argument: boot_params */
    lea tg_bsp_ustack+BSP_USTACK_SIZE(%rip), %rdx
    lea tg_rust_bsp_main(%rip), %rax
    xor %ecx, %ecx                   /* cpu index 0 */
    jmp tg_enter_cpl3

/* The PVH entry, now in long mode: continue as the Linux entry would. */
tg_pvh64:
    mov $BOOT_PARAMS, %esi
    jmp _start

/*
 * Where tg_long32 lands: EBP holds the 64-bit continuation. The upper
 * halves of the registers are undefined after the switch from 32-bit code,
 * so zero-extend before jumping.
 */
tg_long64:
    mov %ebp, %ebp
    jmp *%rbp

/*
 * rax = CPL3 entry point, rdi = its argument, rdx = top of its stack,
 * ecx = cpu index, rsp = top of this CPU's kernel stack (= its TSS.RSP0).
 */
tg_enter_cpl3:
    mov %cr0, %r8
    and $~CR0_CLEAR, %r8
    or $CR0_SET, %r8
    mov %r8, %cr0
    mov $CR4_BITS, %r8d
    mov %r8, %cr4
    lidt tg_idtr(%rip)
    mov %ecx, %r8d
    shl $4, %r8d
    add $TSS_SEL0, %r8d
    ltr %r8w
    sub $8, %rdx                     /* entry sees an ABI-aligned stack */
    pushq $UDATA                     /* ss */
    push %rdx                        /* rsp */
    pushq $USER_RFLAGS               /* rflags */
    pushq $UCODE                     /* cs */
    push %rax                        /* rip */
    iretq

/* AP long-mode entry; tg_ap_boot_index says which CPU this is. */
tg_ap64:
    mov $KDATA, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov tg_ap_boot_index(%rip), %ecx
    lea 1(%rcx), %rax
    imul $KSTACK_SIZE, %rax, %rax
    lea tg_kstacks(%rip), %rsp
    add %rax, %rsp
    imul $AP_USTACK_SIZE, %rcx, %rdx /* AP i uses [base+(i-1)*size, base+i*size) */
    lea tg_ap_ustacks(%rip), %rax
    add %rax, %rdx
    mov %ecx, %edi                   /* argument: cpu index */
    lea tg_rust_ap_main(%rip), %rax
    jmp tg_enter_cpl3

/* ---------------------------- interrupts -------------------------- */
/* 256 stubs, 16 bytes apart: the static IDT points at tg_isr_stubs + 16*n. */
    .balign 4096
    .globl tg_isr_stubs
tg_isr_stubs:
    .set tg_v, 0
    .rept 256
    .balign 16
    .if tg_v == 8 || tg_v == 10 || tg_v == 11 || tg_v == 12 || tg_v == 13 || tg_v == 14 || tg_v == 17 || tg_v == 21 || tg_v == 29 || tg_v == 30
    pushq $tg_v                      /* the CPU pushed an error code */
    .else
    pushq $0
    pushq $tg_v
    .endif
    jmp tg_isr_common
    .set tg_v, tg_v + 1
    .endr
    .balign 16

/*
 * Frame after the pushes below:
 *   0 rdi, 8 rsi, 16 rdx, 24 rcx, 32 rax, 40 vector, 48 error code,
 *   56 rip, 64 cs, 72 rflags, 80 rsp, 88 ss
 */
tg_isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    mov 40(%rsp), %rcx
    cmp $32, %ecx
    jae .Lirq
    cmp $13, %ecx                    /* #GP: maybe bitmap port I/O */
    je .Lgp
    cmp $6, %ecx                     /* #UD: maybe a service call */
    jne .Lcrash
    testb $3, 64(%rsp)               /* only from CPL3 */
    jz .Lcrash
    mov 56(%rsp), %rdx
    cmpw $0x0b0f, (%rdx)             /* ud2 */
    jne .Lcrash
    mov %rax, %rdx
    shr $32, %rdx
    cmp $SVC_MAGIC, %edx
    jne .Lcrash
    cmp $SVC_WAIT, %eax
    je .Lsvc_wait
    cmp $SVC_HALT, %eax
    je .Lsvc_halt
    cmp $SVC_TRIPLEFAULT, %eax
    je .Lsvc_triplefault
    cmp $SVC_STR, %eax
    je .Lsvc_str
    cmp $SVC_IOPL, %eax
    je .Lsvc_iopl
    jmp .Lcrash                      /* unknown service: report the ud2 */

/*
 * SVC_WAIT(rdi = the interrupt count the caller last saw): returns the
 * current count in rax, sleeping with sti;hlt until it differs. IF is 0
 * in here (interrupt gate) and sti delays interrupts by one instruction,
 * so an interrupt between the check and the hlt still wakes the hlt.
 */
.Lsvc_wait:
    addq $2, 56(%rsp)
1:  mov tg_irq_count(%rip), %eax
    cmp %edi, %eax
    jne 2f
    sti
    hlt
    cli
    jmp 1b
2:  mov %rax, 32(%rsp)
    jmp .Lreturn

.Lsvc_halt:
    cli
    hlt
    jmp .Lsvc_halt

/* Empty IDT, then a #GP at CPL0: no handler -> #DF -> triple fault. */
.Lsvc_triplefault:
    lidt tg_idtr_empty(%rip)
    movabs $0x8000000000000000, %rax
    mov (%rax), %rax
    jmp .Lsvc_halt

/* SVC_STR: returns the TR selector in rax (str is CPL0's business here). */
.Lsvc_str:
    addq $2, 56(%rsp)
.Lsvc_str_ret:
    xor %eax, %eax
    str %ax
    mov %rax, 32(%rsp)
    jmp .Lreturn

/*
 * SVC_IOPL(rdi = 0..3): sets the caller's IOPL (popf at CPL3 cannot) and
 * returns the TR selector. Below 3, CPL3 port I/O goes through the TSS
 * I/O bitmap.
 */
.Lsvc_iopl:
    addq $2, 56(%rsp)
    and $3, %edi
    shl $12, %edi
    andq $~RFLAGS_IOPL, 72(%rsp)
    or %rdi, 72(%rsp)
    jmp .Lsvc_str_ret

/*
 * #GP from CPL3 port I/O at IOPL < 3: the TSS I/O bitmap (or the TSS
 * itself) refused the port. At tg_ioprobe_insn (ioport.rs: a probe of a
 * port that must be refused) resume at tg_ioprobe_fault. Anywhere else,
 * print `testguest: #GP at bitmap port I/O (port P, TR S, GDT type T) at
 * RIP` and end the machine with a triple fault (firerunner exits 2), so
 * the failure is told apart from every other crash. T is the type of the
 * TR descriptor in the GDT in memory (11, busy, after any ltr); the type
 * in the CPU's hidden TR, which the I/O check reads, is not readable by
 * the guest. Any other #GP is a crash as usual.
 */
.Lgp:
    testb $3, 64(%rsp)
    jz .Lcrash
    mov 72(%rsp), %eax
    and $RFLAGS_IOPL, %eax
    cmp $RFLAGS_IOPL, %eax
    je .Lcrash
    mov 56(%rsp), %rsi
    lea tg_ioprobe_insn(%rip), %rax
    cmp %rax, %rsi
    jne 1f
    lea tg_ioprobe_fault(%rip), %rax
    mov %rax, 56(%rsp)
    jmp .Lreturn
1:  movzbl (%rsi), %eax              /* the opcode, past one 0x66 prefix */
    cmp $0x66, %eax
    jne 2f
    inc %rsi
    movzbl (%rsi), %eax
2:  mov %eax, %edx
    and $0xfc, %edx
    cmp $0xe4, %edx                  /* in/out with an imm8 port */
    jne 3f
    movzbl 1(%rsi), %r12d
    jmp 4f
3:  cmp $0xec, %edx                  /* in/out with the port in dx */
    je 5f
    cmp $0x6c, %edx                  /* ins/outs */
    jne .Lcrash
5:  movzwl 16(%rsp), %r12d
4:  xor %eax, %eax                   /* r13 = TR selector, r14 = its type */
    str %ax
    mov %eax, %r13d
    sub $16, %rsp
    sgdt (%rsp)
    mov 2(%rsp), %rdx
    add $16, %rsp
    and $0xfff8, %eax
    movzbl 5(%rdx,%rax), %r14d
    and $15, %r14d
    /*
     * No console lock: the line the faulting code was printing holds it
     * and has printed nothing yet (its first port access faulted), and
     * the other CPUs are parked by now.
     */
    lea tg_msg_iogp(%rip), %rsi
    call tg_puts
    mov %r12, %rax
    call tg_puthex
    lea tg_msg_iogp_tr(%rip), %rsi
    call tg_puts
    mov %r13, %rax
    call tg_puthex
    lea tg_msg_iogp_type(%rip), %rsi
    call tg_puts
    mov %r14, %rax
    call tg_putdec
    lea tg_msg_iogp_at(%rip), %rsi
    call tg_puts
    mov 56(%rsp), %rax
    call tg_puthex
    mov $10, %eax
    call tg_putc
    jmp .Lsvc_triplefault

/* Device interrupt: count it (total and per vector) and EOI. */
.Lirq:
    cmp $SPURIOUS_VECTOR, %ecx
    je .Lreturn                      /* spurious: no EOI */
    lea tg_irq_vec_count(%rip), %rdx
    lock incl (%rdx,%rcx,4)
    lock incl tg_irq_count(%rip)
    mov $LAPIC_EOI, %edx
    movl $0, (%rdx)
.Lreturn:
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq

/*
 * Anything else is a bug: one line on the serial port, then reset through
 * the i8042 so a test never hangs.
 */
.Lcrash:
    mov $20000, %ecx                 /* take the console lock, boundedly: */
1:  mov $1, %eax                     /* its holder may be what crashed */
    xchg %eax, tg_console_lock(%rip)
    test %eax, %eax
    jz 2f
    dec %ecx
    jnz 1b
2:  lea tg_msg_exception(%rip), %rsi
    call tg_puts
    mov 40(%rsp), %rax
    call tg_putdec
    lea tg_msg_at(%rip), %rsi
    call tg_puts
    mov 56(%rsp), %rax
    call tg_puthex
    lea tg_msg_err(%rip), %rsi
    call tg_puts
    mov 48(%rsp), %rax
    call tg_puthex
    mov $10, %eax
    call tg_putc
    in $I8042_STATUS, %al            /* no i8042 (QEMU microvm) reads 0xff: */
    cmp $0xff, %al                   /* then a triple fault ends the machine */
    je .Lsvc_triplefault
    mov $0xfe, %al
    out %al, $I8042_STATUS
    jmp .Lsvc_halt

/* al = byte. Clobbers eax, edx, r8d. */
tg_putc:
    mov %eax, %r8d
1:  mov $0x3fd, %edx
    in %dx, %al
    test $0x20, %al
    jz 1b
    mov %r8d, %eax
    mov $0x3f8, %edx
    out %al, %dx
    ret

/* rsi = NUL-terminated string. */
tg_puts:
1:  movzbl (%rsi), %eax
    test %eax, %eax
    jz 2f
    call tg_putc
    inc %rsi
    jmp 1b
2:  ret

/* rax = value, printed in decimal. */
tg_putdec:
    sub $32, %rsp
    lea 31(%rsp), %rsi
    movb $0, (%rsi)
    mov $10, %r9d
1:  xor %edx, %edx
    div %r9
    add $48, %edx
    dec %rsi
    mov %dl, (%rsi)
    test %rax, %rax
    jnz 1b
    call tg_puts
    add $32, %rsp
    ret

/* rax = value, printed as 0x<hex> without leading zeros. */
tg_puthex:
    mov %rax, %r10
    mov $48, %eax
    call tg_putc
    mov $120, %eax
    call tg_putc
    mov $60, %ecx
1:  mov %r10, %rax                   /* skip leading zero nibbles */
    shr %cl, %rax
    test $15, %eax
    jnz 2f
    test %ecx, %ecx
    jz 2f
    sub $4, %ecx
    jmp 1b
2:  mov %r10, %rax
    shr %cl, %rax
    and $15, %eax
    cmp $10, %eax
    jb 3f
    add $39, %eax
3:  add $48, %eax
    call tg_putc
    sub $4, %ecx
    jns 2b
    ret

/* ------------------- AP trampoline, 16-bit part ------------------- */
/* Copied to 0x1000 (SIPI vector 0x01): CS = 0x100, IP = 0. */
    .section .cpl0.ap16, "ax", @progbits
    .code16
    .globl tg_ap16_start
    .globl tg_ap16_end
tg_ap16_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tg_ap16_gdtr - tg_ap16_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $KCODE32, $tg_ap32
    .balign 8
tg_ap16_gdtr:
    .word tg_gdt_end - tg_gdt - 1
    .long tg_gdt
tg_ap16_end:

/* ------------------------ 32-bit code ----------------------------- */
    .section .text.cpl0_32, "ax", @progbits
    .code32

/*
 * PVH entry (x86/HVM direct boot ABI, announced by the ELF note below):
 * protected mode, paging off, flat CS/DS/ES, IF = 0, EBX = physical
 * address of struct hvm_start_info:
 *    0 magic, 4 version, 24 cmdline_paddr (u64),
 *   40 memmap_paddr (u64), 48 memmap_entries  (version >= 1)
 * memmap entries are 24 bytes (u64 addr, u64 size, u32 type, u32 pad),
 * type 1 = RAM, like e820's 20-byte entries. Only the boot_params fields
 * bootinfo.rs reads are written: the page may hold the loader's leftovers.
 * Without a start info or a memory map (version 0) the body sees no RAM.
 */
    .globl tg_pvh_start
tg_pvh_start:
    cli
    cld
    mov $BOOT_PARAMS, %edi
    xor %eax, %eax
    mov %eax, BP_CMD_LINE_PTR(%edi)
    mov %eax, BP_EXT_CMD_LINE_PTR(%edi)
    movb %al, BP_E820_ENTRIES(%edi)
    cmpl $PVH_MAGIC, (%ebx)
    jne 3f
    mov 24(%ebx), %eax
    mov %eax, BP_CMD_LINE_PTR(%edi)
    mov 28(%ebx), %eax
    mov %eax, BP_EXT_CMD_LINE_PTR(%edi)
    cmpl $1, 4(%ebx)
    jb 3f
    cmpl $0, 44(%ebx)                /* a map above 4 GiB: unreachable here */
    jne 3f
    mov 40(%ebx), %esi
    mov 48(%ebx), %ecx
    cmp $E820_MAX, %ecx
    jbe 1f
    mov $E820_MAX, %ecx
1:  movb %cl, BP_E820_ENTRIES(%edi)
    add $BP_E820_TABLE, %edi
    test %ecx, %ecx
    jz 3f
2:  movsl                            /* addr, size, type: 20 bytes */
    movsl
    movsl
    movsl
    movsl
    add $4, %esi                     /* skip the padding word */
    dec %ecx
    jnz 2b
3:  lgdt tg_gdtr                     /* 32-bit lgdt: the base is below 4 GiB */
    mov $tg_pvh64, %ebp
    jmp tg_long32

/* AP protected-mode step (from the trampoline, our GDT loaded). */
tg_ap32:
    mov $tg_ap64, %ebp

/*
 * Protected mode with our GDT loaded -> long mode on our page tables, on
 * to the 64-bit code at EBP (via tg_long64).
 */
tg_long32:
    mov $KDATA, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $CR4_BITS, %eax
    mov %eax, %cr4
    mov $tg_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx            /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $~CR0_CLEAR, %eax
    or $(0x80000001 | CR0_SET), %eax /* PG | PE */
    mov %eax, %cr0
    ljmp $KCODE, $tg_long64
    .code64

/*
 * The PVH ELF note (Xen's XEN_ELFNOTE_PHYS32_ENTRY): its presence tells a
 * PVH loader to enter at tg_pvh_start. 4-byte alignment (QEMU pads the
 * name to the segment's alignment); an 8-byte descriptor, as Linux's,
 * because QEMU reads the entry as a 64-bit value.
 */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4                          /* namesz */
    .long 8                          /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .quad tg_pvh_start

/* ------------------------------ data ------------------------------ */
    .section .data.cpl0, "aw", @progbits
    .balign 16
tg_gdtr:
    .word tg_gdt_end - tg_gdt - 1
    .quad tg_gdt
    .balign 16
tg_idtr:
    .word 256 * 16 - 1
    .quad tg_idt
    .balign 16
tg_idtr_empty:
    .word 0
    .quad 0

    .balign 64
    .globl tg_ap_boot_index
    .globl tg_console_lock
    .globl tg_irq_count
    .globl tg_irq_vec_count
tg_ap_boot_index:   .long 0
tg_console_lock:    .long 0
tg_irq_count:       .long 0
    .balign 64
tg_irq_vec_count:   .fill 256, 4, 0

tg_msg_exception:   .asciz "testguest: exception "
tg_msg_at:          .asciz " at "
tg_msg_err:         .asciz " err "
tg_msg_iogp:        .asciz "testguest: #GP at bitmap port I/O (port "
tg_msg_iogp_tr:     .asciz ", TR "
tg_msg_iogp_type:   .asciz ", GDT type "
tg_msg_iogp_at:     .asciz ") at "

    .balign 16
    .globl tg_gdt
tg_gdt:
    .quad 0
    .quad 0x00af9b000000ffff         /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff         /* 0x10 kernel data */
    .quad 0x00cff3000000ffff         /* 0x18 user data (DPL3) */
    .quad 0x00affb000000ffff         /* 0x20 user code, 64-bit (DPL3) */
    .quad 0x00cf9b000000ffff         /* 0x28 kernel code, 32-bit (AP boot) */
    .set tg_v, 0
    .rept MAX_CPUS                   /* 0x30 + 16*i: TSS of CPU i */
    .word TSS_SIZE - 1
    .word tg_tss_lo16 + TSS_SIZE * tg_v /* the linker script splits the base */
    .byte tg_tss_b2
    .byte 0x89                       /* present, available 64-bit TSS */
    .byte 0
    .byte tg_tss_b3
    .long 0
    .long 0
    .set tg_v, tg_v + 1
    .endr
tg_gdt_end:

    .balign 4096
tg_idt:
    .set tg_v, 0
    .rept 256
    .word tg_isr_lo16 + 16 * tg_v
    .word KCODE
    .byte 0
    .byte 0x8e                       /* present, DPL0, interrupt gate */
    .word tg_isr_hi16
    .long 0
    .long 0
    .set tg_v, tg_v + 1
    .endr

/*
 * 256 bytes per TSS: RSP0 = top of that CPU's kernel stack, then an I/O
 * permission bitmap of zeros (ports 0..1215 allowed at CPL3, every other
 * port is beyond the TSS limit). IOPL=3 alone should do, but the
 * development host's hypervisor emulates CPL3 port I/O and keeps the
 * guest's IOPL at 0, while it honours the TSS bitmap. `ioport=bitmap`
 * (ioport.rs) narrows the BSP's bitmap and drops to IOPL 0.
 */
    .balign 16384
    .globl tg_tss
tg_tss:
    .set tg_v, 0
    .rept MAX_CPUS
    .long 0
    .quad tg_kstacks + (tg_v + 1) * KSTACK_SIZE
    .fill 11, 8, 0
    .word 0
    .word 104                        /* I/O bitmap offset */
    .fill TSS_SIZE - 104, 1, 0       /* the bitmap: every port allowed */
    .set tg_v, tg_v + 1
    .endr

/*
 * Identity map of 0..16 GiB with 2 MiB pages, user-accessible (the Rust
 * body runs at CPL3 and does its own port and MMIO I/O). The MMIO hole
 * 0xc0000000..0x100000000 is uncached (PCD|PWT).
 */
    .balign 4096
    .globl tg_pml4
tg_pml4:
    .quad tg_pdpt + 0x7
    .fill 511, 8, 0
tg_pdpt:
    .set tg_v, 0
    .rept 16
    .quad tg_pd + tg_v * 4096 + 0x7
    .set tg_v, tg_v + 1
    .endr
    .fill 512 - 16, 8, 0
tg_pd:
    .set tg_v, 0
    .rept 16 * 512
    .if tg_v >= 1536 && tg_v < 2048
    .quad (tg_v << 21) | 0x9f
    .else
    .quad (tg_v << 21) | 0x87
    .endif
    .set tg_v, tg_v + 1
    .endr

/* ------------------------------ stacks ---------------------------- */
    .section .bss.cpl0, "aw", @nobits
    .balign 4096
tg_kstacks:
    .skip MAX_CPUS * KSTACK_SIZE
    .balign 4096
tg_bsp_ustack:
    .skip BSP_USTACK_SIZE
tg_ap_ustacks:
    .skip (MAX_CPUS - 1) * AP_USTACK_SIZE

    .text
