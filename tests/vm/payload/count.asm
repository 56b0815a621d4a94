; The VM of the QEMU scenario: a 512-byte boot sector that counts in its own RAM and prints the
; count on COM1 every 2^20 steps, as 8 hex digits and CR LF. Proof that a VM *kept running* across
; a live update: the count lives only in guest RAM (linear 0x500, memfd offset 0x500), so after a
; restore the first line printed follows the last one printed before the stop.
; Assemble: nasm -f bin -o count.bin count.asm
bits 16
org 0x7c00

COUNT   equ 0x500           ; dword: the counter, in the guest's RAM
COM1    equ 0x3f8

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    cld
    ; 16550: no interrupts, 115200 baud (divisor 1), 8N1
    mov dx, COM1 + 1
    xor al, al
    out dx, al
    mov dx, COM1 + 3
    mov al, 0x80
    out dx, al
    mov dx, COM1
    mov al, 1
    out dx, al
    mov dx, COM1 + 1
    xor al, al
    out dx, al
    mov dx, COM1 + 3
    mov al, 3
    out dx, al
    ; a cold boot starts from 0; a restored VM never comes back here (its CPU state is restored)
    mov dword [COUNT], 0

step:
    add dword [COUNT], 1
    test dword [COUNT], 0xfffff
    jnz step
    mov ax, [COUNT + 2]
    call hex16
    mov ax, [COUNT]
    call hex16
    mov al, 13
    call putc
    mov al, 10
    call putc
    jmp step

hex16:                      ; print ax as four hex digits
    mov cx, 4
.digit:
    rol ax, 4
    push ax
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .print
    add al, 'A' - '0' - 10
.print:
    call putc
    pop ax
    loop .digit
    ret

putc:                       ; al to COM1 once its transmitter is empty
    mov bl, al
    mov dx, COM1 + 5
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    mov al, bl
    mov dx, COM1
    out dx, al
    ret

    times 510 - ($ - $$) db 0
    dw 0xaa55
