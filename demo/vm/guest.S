# luo-vm-guest: the smallest guest that shows whether it was resumed or rebooted.  A 512-byte boot sector
# (x86, real mode) that keeps its state in guest RAM only:
#   0x500  boot id: the TSC at boot (8 bytes; a reboot makes a new one)
#   0x508  a counter, incremented at every wake-up from HLT (the BIOS timer wakes it 18.2 times a second)
#   0x50c  the BIOS tick count (0x46c) at boot: uptime = (ticks now - ticks at boot) / 18.2065
#   0x510  the magic "LUOVGM01", written once the region below is filled
#   16 MiB at 16 MiB: filled once at boot from an xorshift32 seeded by the boot id (checksummed by the tests)
# and prints "luo-vm-guest: booted" to COM1 at boot.  Built by demo/vm/build-guest.sh.
    .code16
    .text
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    ljmp $0, $1f
1:
    # "Unreal mode": load a 4 GiB data segment in protected mode and come back; DS keeps the 4 GiB limit,
    # so real-mode code can write above 1 MiB.
    lgdt gdtr
    movl %cr0, %eax
    orb $1, %al
    movl %eax, %cr0
    movw $8, %bx
    movw %bx, %ds
    andb $0xfe, %al
    movl %eax, %cr0
    xorw %ax, %ax
    movw %ax, %ds
    rdtsc
    movl %eax, 0x500
    movl %edx, 0x504
    movl $0, 0x508
    movl 0x46c, %ecx
    movl %ecx, 0x50c
    movl %eax, %ebx
    orl $1, %ebx
    movl $0x1000000, %edi
fill:
    movl %ebx, %edx
    shll $13, %edx
    xorl %edx, %ebx
    movl %ebx, %edx
    shrl $17, %edx
    xorl %edx, %ebx
    movl %ebx, %edx
    shll $5, %edx
    xorl %edx, %ebx
    movl %ebx, (%edi)
    addl $4, %edi
    cmpl $0x2000000, %edi
    jb fill
    movl $0x564f554c, 0x510
    movl $0x31304d47, 0x514
    movw $msg, %si
    movw $0x3f8, %dx
print:
    lodsb
    testb %al, %al
    jz idle
    outb %al, %dx
    jmp print
idle:
    sti
    hlt
    incl 0x508
    jmp idle

    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf92000000ffff
gdtr:
    .word gdtr - gdt - 1
    .long gdt
msg:
    .asciz "luo-vm-guest: booted\r\n"
    .org 510
    .word 0xaa55
