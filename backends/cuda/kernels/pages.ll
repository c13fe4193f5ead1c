; drm-pagemap-cuda: the gather/scatter kernel of pages.cu in LLVM IR (typed pointers,
; LLVM 14), for machines without NVRTC. Regenerate pages.ptx with ./regen.sh.
; Parameters are 64-bit integers where pages.cu has pointers: the same kernel ABI.
target datalayout = "e-i64:64-i128:128-v16:16-v32:32-n16:32:64"
target triple = "nvptx64-nvidia-cuda"

declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()
declare i64 @llvm.nvvm.read.ptx.sreg.clock64()

define void @dpm_copy_pages(i64 %pfns, i64 %addrs, i64 %n_items, i64 %own_base, i32 %item_shift, i32 %to_own, i64 %abort) {
check:
  %has_abort = icmp ne i64 %abort, 0
  br i1 %has_abort, label %read_abort, label %entry

read_abort:
  %abort_p = inttoptr i64 %abort to i32 addrspace(1)*
  %abort_v = load volatile i32, i32 addrspace(1)* %abort_p, align 4
  %aborted = icmp eq i32 %abort_v, 2
  br i1 %aborted, label %exit, label %entry

entry:
  %tid = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %ctaid = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %ntid = call i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
  %nctaid = call i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()
  %tid64 = zext i32 %tid to i64
  %ctaid64 = zext i32 %ctaid to i64
  %ntid64 = zext i32 %ntid to i64
  %nctaid64 = zext i32 %nctaid to i64
  %blockstart = mul i64 %ctaid64, %ntid64
  %gtid = add i64 %blockstart, %tid64
  %warp = lshr i64 %gtid, 5
  %nthreads = mul i64 %nctaid64, %ntid64
  %nwarps = lshr i64 %nthreads, 5
  %lane = and i64 %tid64, 31
  %loff = shl i64 %lane, 4
  %sh = zext i32 %item_shift to i64
  %one = shl i64 1, %sh
  %mask = sub i64 %one, 1
  %toown = icmp ne i32 %to_own, 0
  %addrs_p = inttoptr i64 %addrs to i64 addrspace(1)*
  %pfns_p = inttoptr i64 %pfns to i32 addrspace(1)*
  br label %loop

loop:
  %item = phi i64 [ %warp, %entry ], [ %next, %cont ]
  %done = icmp uge i64 %item, %n_items
  br i1 %done, label %exit, label %body

body:
  %e = lshr i64 %item, %sh
  %ap = getelementptr i64, i64 addrspace(1)* %addrs_p, i64 %e
  %other0 = load i64, i64 addrspace(1)* %ap, align 8
  %skip = icmp eq i64 %other0, 0
  br i1 %skip, label %cont, label %copy

copy:
  %subi = and i64 %item, %mask
  %sub = shl i64 %subi, 12
  %pp = getelementptr i32, i32 addrspace(1)* %pfns_p, i64 %e
  %pfn = load i32, i32 addrspace(1)* %pp, align 4
  %pfn64 = zext i32 %pfn to i64
  %pfnb = shl i64 %pfn64, 12
  %own0 = add i64 %own_base, %pfnb
  %own = add i64 %own0, %sub
  %other = add i64 %other0, %sub
  %src = select i1 %toown, i64 %other, i64 %own
  %dst = select i1 %toown, i64 %own, i64 %other
  %s0 = add i64 %src, %loff
  %d0 = add i64 %dst, %loff
  %sp0 = inttoptr i64 %s0 to <4 x i32> addrspace(1)*
  %dp0 = inttoptr i64 %d0 to <4 x i32> addrspace(1)*
  %sp1 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %sp0, i64 32
  %sp2 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %sp0, i64 64
  %sp3 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %sp0, i64 96
  %sp4 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %sp0, i64 128
  %sp5 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %sp0, i64 160
  %sp6 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %sp0, i64 192
  %sp7 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %sp0, i64 224
  %v0 = load <4 x i32>, <4 x i32> addrspace(1)* %sp0, align 16
  %v1 = load <4 x i32>, <4 x i32> addrspace(1)* %sp1, align 16
  %v2 = load <4 x i32>, <4 x i32> addrspace(1)* %sp2, align 16
  %v3 = load <4 x i32>, <4 x i32> addrspace(1)* %sp3, align 16
  %v4 = load <4 x i32>, <4 x i32> addrspace(1)* %sp4, align 16
  %v5 = load <4 x i32>, <4 x i32> addrspace(1)* %sp5, align 16
  %v6 = load <4 x i32>, <4 x i32> addrspace(1)* %sp6, align 16
  %v7 = load <4 x i32>, <4 x i32> addrspace(1)* %sp7, align 16
  %dp1 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %dp0, i64 32
  %dp2 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %dp0, i64 64
  %dp3 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %dp0, i64 96
  %dp4 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %dp0, i64 128
  %dp5 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %dp0, i64 160
  %dp6 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %dp0, i64 192
  %dp7 = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %dp0, i64 224
  store <4 x i32> %v0, <4 x i32> addrspace(1)* %dp0, align 16
  store <4 x i32> %v1, <4 x i32> addrspace(1)* %dp1, align 16
  store <4 x i32> %v2, <4 x i32> addrspace(1)* %dp2, align 16
  store <4 x i32> %v3, <4 x i32> addrspace(1)* %dp3, align 16
  store <4 x i32> %v4, <4 x i32> addrspace(1)* %dp4, align 16
  store <4 x i32> %v5, <4 x i32> addrspace(1)* %dp5, align 16
  store <4 x i32> %v6, <4 x i32> addrspace(1)* %dp6, align 16
  store <4 x i32> %v7, <4 x i32> addrspace(1)* %dp7, align 16
  br label %cont

cont:
  %next = add i64 %item, %nwarps
  br label %loop

exit:
  ret void
}

define void @dpm_zero(i64 %dst, i64 %bytes) {
entry:
  %tid = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %ctaid = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %ntid = call i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
  %nctaid = call i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()
  %tid64 = zext i32 %tid to i64
  %ctaid64 = zext i32 %ctaid to i64
  %ntid64 = zext i32 %ntid to i64
  %nctaid64 = zext i32 %nctaid to i64
  %blockstart = mul i64 %ctaid64, %ntid64
  %first = add i64 %blockstart, %tid64
  %stride = mul i64 %nctaid64, %ntid64
  %n = lshr i64 %bytes, 4
  %base = inttoptr i64 %dst to <4 x i32> addrspace(1)*
  br label %loop

loop:
  %i = phi i64 [ %first, %entry ], [ %next, %body ]
  %more = icmp ult i64 %i, %n
  br i1 %more, label %body, label %exit

body:
  %p = getelementptr <4 x i32>, <4 x i32> addrspace(1)* %base, i64 %i
  store <4 x i32> zeroinitializer, <4 x i32> addrspace(1)* %p, align 16
  %next = add i64 %i, %stride
  br label %loop

exit:
  ret void
}

define void @dpm_spin(i64 %ns) {
entry:
  %c0 = call i64 @llvm.nvvm.read.ptx.sreg.clock64()
  %t0 = call i64 asm sideeffect "mov.u64 $0, %globaltimer;", "=l"()
  br label %loop

loop:
  %t = call i64 asm sideeffect "mov.u64 $0, %globaltimer;", "=l"()
  %d = sub i64 %t, %t0
  %short_t = icmp ult i64 %d, %ns
  %c = call i64 @llvm.nvvm.read.ptx.sreg.clock64()
  %dc = sub i64 %c, %c0
  %short_c = icmp ult i64 %dc, %ns
  %again = or i1 %short_t, %short_c
  br i1 %again, label %loop, label %exit

exit:
  ret void
}

define void @dpm_wait(i64 %flag, i64 %max_cycles) {
entry:
  %c0 = call i64 @llvm.nvvm.read.ptx.sreg.clock64()
  %fp = inttoptr i64 %flag to i32 addrspace(1)*
  %limited = icmp ne i64 %max_cycles, 0
  br label %loop

loop:
  %v = load volatile i32, i32 addrspace(1)* %fp, align 4
  %set = icmp ne i32 %v, 0
  br i1 %set, label %exit, label %timer

timer:
  %c = call i64 @llvm.nvvm.read.ptx.sreg.clock64()
  %dc = sub i64 %c, %c0
  %over = icmp uge i64 %dc, %max_cycles
  %stop = and i1 %limited, %over
  br i1 %stop, label %exit, label %loop

exit:
  ret void
}

; The ring's persistent kernel (dpm_ring of pages.cu; see there and src/ring/): one block of
; 512 threads. Header words (u64): head 0, stop 1, done 8, alive 9, exited 10, fault 11;
; slots of 800 bytes from byte 128: seq 0, own_base 8, n_entries 16, item_shift 20, to_own 24,
; addrs 32, pfns 544. Loads of system memory are ld.global.cv (no stale cached line).
@ring_desc = internal addrspace(3) global [50 x <4 x i32>] undef, align 16
@ring_exit = internal addrspace(3) global i32 undef, align 4
@ring_next = internal addrspace(3) global i64 undef, align 8

declare void @llvm.nvvm.barrier0()
declare void @llvm.nvvm.membar.sys()

define void @dpm_ring(i64 %ring, i64 %epoch, i64 %lease_ns) {
entry:
  %tid = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %tid64 = zext i32 %tid to i64
  %t0 = call i64 asm sideeffect "mov.u64 $0, %globaltimer;", "=l"()
  %hp = inttoptr i64 %ring to i64 addrspace(1)*
  %stop_p = getelementptr i64, i64 addrspace(1)* %hp, i64 1
  %done_p = getelementptr i64, i64 addrspace(1)* %hp, i64 8
  %alive_p = getelementptr i64, i64 addrspace(1)* %hp, i64 9
  %exited_p = getelementptr i64, i64 addrspace(1)* %hp, i64 10
  %fault_p = getelementptr i64, i64 addrspace(1)* %hp, i64 11
  %next_s = getelementptr [1 x i64], [1 x i64] addrspace(3)* bitcast (i64 addrspace(3)* @ring_next to [1 x i64] addrspace(3)*), i64 0, i64 0
  %is0 = icmp eq i32 %tid, 0
  %lane = and i64 %tid64, 31
  %loff = shl i64 %lane, 4
  %warp = lshr i64 %tid64, 5
  %desc_s = getelementptr [50 x <4 x i32>], [50 x <4 x i32>] addrspace(3)* @ring_desc, i64 0, i64 0
  %desc_b = bitcast <4 x i32> addrspace(3)* %desc_s to i8 addrspace(3)*
  %seq_s = bitcast <4 x i32> addrspace(3)* %desc_s to i64 addrspace(3)*
  %base_s0 = getelementptr i8, i8 addrspace(3)* %desc_b, i64 8
  %base_s = bitcast i8 addrspace(3)* %base_s0 to i64 addrspace(3)*
  %n_s0 = getelementptr i8, i8 addrspace(3)* %desc_b, i64 16
  %n_s = bitcast i8 addrspace(3)* %n_s0 to i32 addrspace(3)*
  %sh_s0 = getelementptr i8, i8 addrspace(3)* %desc_b, i64 20
  %sh_s = bitcast i8 addrspace(3)* %sh_s0 to i32 addrspace(3)*
  %to_s0 = getelementptr i8, i8 addrspace(3)* %desc_b, i64 24
  %to_s = bitcast i8 addrspace(3)* %to_s0 to i32 addrspace(3)*
  %addrs_s0 = getelementptr i8, i8 addrspace(3)* %desc_b, i64 32
  %addrs_s = bitcast i8 addrspace(3)* %addrs_s0 to i64 addrspace(3)*
  %pfns_s0 = getelementptr i8, i8 addrspace(3)* %desc_b, i64 544
  %pfns_s = bitcast i8 addrspace(3)* %pfns_s0 to i32 addrspace(3)*
  %my_s = getelementptr [50 x <4 x i32>], [50 x <4 x i32>] addrspace(3)* @ring_desc, i64 0, i64 %tid64
  %my_s64 = ptrtoint <4 x i32> addrspace(3)* %my_s to i64
  %loader = icmp ult i32 %tid, 50
  br i1 %is0, label %init, label %init_sync

init:
  store volatile i64 %epoch, i64 addrspace(1)* %alive_p, align 8
  call void @llvm.nvvm.membar.sys()
  %done0 = load volatile i64, i64 addrspace(1)* %done_p, align 8
  %sat = icmp eq i64 %done0, -1
  %done1 = add i64 %done0, 1
  %next0 = select i1 %sat, i64 %done0, i64 %done1
  store i64 %next0, i64 addrspace(3)* %next_s, align 8
  br label %init_sync

init_sync:
  call void @llvm.nvvm.barrier0()
  %next_init = load i64, i64 addrspace(3)* %next_s, align 8
  br label %top

top:
  %next = phi i64 [ %next_init, %init_sync ], [ %next, %retry ], [ %next_inc, %done_sync ]
  %tries = phi i32 [ 0, %init_sync ], [ %tries1, %retry ], [ 0, %done_sync ]
  br i1 %is0, label %poll, label %poll_sync

poll:
  %polls = phi i32 [ 0, %top ], [ %polls1, %poll_more ], [ %polls1, %read_stop ]
  %now = call i64 asm sideeffect "mov.u64 $0, %globaltimer;", "=l"()
  %el = sub i64 %now, %t0
  %expired = icmp uge i64 %el, %lease_ns
  br i1 %expired, label %quit, label %chk_head

chk_head:
  %notmax = icmp ne i64 %next, -1
  %h = load volatile i64, i64 addrspace(1)* %hp, align 8
  %has = icmp uge i64 %h, %next
  %take = and i1 %notmax, %has
  br i1 %take, label %take_it, label %poll_more

poll_more:
  %polls1 = add i32 %polls, 1
  %m = and i32 %polls1, 15
  %sixteenth = icmp eq i32 %m, 0
  br i1 %sixteenth, label %read_stop, label %poll

read_stop:
  %st = load volatile i64, i64 addrspace(1)* %stop_p, align 8
  %stopped = icmp uge i64 %st, %epoch
  br i1 %stopped, label %quit, label %poll

quit:
  call void @llvm.nvvm.membar.sys()
  store i32 1, i32 addrspace(3)* @ring_exit, align 4
  br label %poll_sync

take_it:
  call void @llvm.nvvm.membar.sys()
  store i32 0, i32 addrspace(3)* @ring_exit, align 4
  br label %poll_sync

poll_sync:
  call void @llvm.nvvm.barrier0()
  %ex = load i32, i32 addrspace(3)* @ring_exit, align 4
  %isex = icmp ne i32 %ex, 0
  br i1 %isex, label %out, label %load

load:
  %slot = and i64 %next, 63
  %slot_off = mul i64 %slot, 800
  %desc0 = add i64 %ring, 128
  %desc_g = add i64 %desc0, %slot_off
  br i1 %loader, label %load_one, label %load_sync

load_one:
  %my_off = shl i64 %tid64, 4
  %my_g = add i64 %desc_g, %my_off
  call void asm sideeffect "{ .reg .b32 r<4>; ld.global.cv.v4.u32 {r0,r1,r2,r3}, [$0]; st.shared.v4.u32 [$1], {r0,r1,r2,r3}; }", "l,l,~{memory}"(i64 %my_g, i64 %my_s64)
  br label %load_sync

load_sync:
  call void @llvm.nvvm.barrier0()
  %seq = load i64, i64 addrspace(3)* %seq_s, align 16
  %ok = icmp eq i64 %seq, %next
  br i1 %ok, label %copy_setup, label %mismatch

mismatch:
  %tries1 = add i32 %tries, 1
  %give = icmp eq i32 %tries1, 1048576
  br i1 %give, label %fault, label %retry

fault:
  br i1 %is0, label %fault_w, label %out

fault_w:
  store volatile i64 %next, i64 addrspace(1)* %fault_p, align 8
  br label %out

retry:
  call void @llvm.nvvm.barrier0()
  br label %top

copy_setup:
  %own_base = load i64, i64 addrspace(3)* %base_s, align 8
  %n_entries = load i32, i32 addrspace(3)* %n_s, align 4
  %shift = load i32, i32 addrspace(3)* %sh_s, align 4
  %to_own = load i32, i32 addrspace(3)* %to_s, align 4
  %n64 = zext i32 %n_entries to i64
  %sh = zext i32 %shift to i64
  %n_items = shl i64 %n64, %sh
  %one = shl i64 1, %sh
  %mask = sub i64 %one, 1
  %toown = icmp ne i32 %to_own, 0
  br label %item_loop

item_loop:
  %item = phi i64 [ %warp, %copy_setup ], [ %item_next, %item_cont ]
  %more = icmp ult i64 %item, %n_items
  br i1 %more, label %item_body, label %copy_end

item_body:
  %e = lshr i64 %item, %sh
  %ap = getelementptr i64, i64 addrspace(3)* %addrs_s, i64 %e
  %other0 = load i64, i64 addrspace(3)* %ap, align 8
  %skip = icmp eq i64 %other0, 0
  br i1 %skip, label %item_cont, label %item_copy

item_copy:
  %subi = and i64 %item, %mask
  %sub = shl i64 %subi, 12
  %pp = getelementptr i32, i32 addrspace(3)* %pfns_s, i64 %e
  %pfn = load i32, i32 addrspace(3)* %pp, align 4
  %pfn64 = zext i32 %pfn to i64
  %pfnb = shl i64 %pfn64, 12
  %own0 = add i64 %own_base, %pfnb
  %own = add i64 %own0, %sub
  %other = add i64 %other0, %sub
  %src0 = select i1 %toown, i64 %other, i64 %own
  %dst0 = select i1 %toown, i64 %own, i64 %other
  %src = add i64 %src0, %loff
  %dst = add i64 %dst0, %loff
  call void asm sideeffect "{ .reg .b32 a<32>; ld.global.cv.v4.u32 {a0,a1,a2,a3}, [$0+0]; ld.global.cv.v4.u32 {a4,a5,a6,a7}, [$0+512]; ld.global.cv.v4.u32 {a8,a9,a10,a11}, [$0+1024]; ld.global.cv.v4.u32 {a12,a13,a14,a15}, [$0+1536]; ld.global.cv.v4.u32 {a16,a17,a18,a19}, [$0+2048]; ld.global.cv.v4.u32 {a20,a21,a22,a23}, [$0+2560]; ld.global.cv.v4.u32 {a24,a25,a26,a27}, [$0+3072]; ld.global.cv.v4.u32 {a28,a29,a30,a31}, [$0+3584]; st.global.v4.u32 [$1+0], {a0,a1,a2,a3}; st.global.v4.u32 [$1+512], {a4,a5,a6,a7}; st.global.v4.u32 [$1+1024], {a8,a9,a10,a11}; st.global.v4.u32 [$1+1536], {a12,a13,a14,a15}; st.global.v4.u32 [$1+2048], {a16,a17,a18,a19}; st.global.v4.u32 [$1+2560], {a20,a21,a22,a23}; st.global.v4.u32 [$1+3072], {a24,a25,a26,a27}; st.global.v4.u32 [$1+3584], {a28,a29,a30,a31}; }", "l,l,~{memory}"(i64 %src, i64 %dst)
  br label %item_cont

item_cont:
  %item_next = add i64 %item, 16
  br label %item_loop

copy_end:
  call void @llvm.nvvm.membar.sys()
  call void @llvm.nvvm.barrier0()
  br i1 %is0, label %publish, label %done_sync

publish:
  store volatile i64 %next, i64 addrspace(1)* %done_p, align 8
  call void @llvm.nvvm.membar.sys()
  br label %done_sync

done_sync:
  %next_inc = add i64 %next, 1
  br label %top

out:
  br i1 %is0, label %fin, label %ret

fin:
  call void @llvm.nvvm.membar.sys()
  store volatile i64 %epoch, i64 addrspace(1)* %exited_p, align 8
  call void @llvm.nvvm.membar.sys()
  br label %ret

ret:
  ret void
}

!nvvm.annotations = !{!0, !1, !2, !3, !4, !5, !6, !7}
!0 = !{void (i64, i64, i64, i64, i32, i32, i64)* @dpm_copy_pages, !"kernel", i32 1}
!1 = !{void (i64, i64, i64, i64, i32, i32, i64)* @dpm_copy_pages, !"maxntidx", i32 256}
!2 = !{void (i64)* @dpm_spin, !"kernel", i32 1}
!3 = !{void (i64, i64)* @dpm_wait, !"kernel", i32 1}
!4 = !{void (i64, i64)* @dpm_zero, !"kernel", i32 1}
!5 = !{void (i64, i64)* @dpm_zero, !"maxntidx", i32 256}
!6 = !{void (i64, i64, i64)* @dpm_ring, !"kernel", i32 1}
!7 = !{void (i64, i64, i64)* @dpm_ring, !"maxntidx", i32 512}
