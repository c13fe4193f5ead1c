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

!nvvm.annotations = !{!0, !1, !2, !3, !4, !5}
!0 = !{void (i64, i64, i64, i64, i32, i32, i64)* @dpm_copy_pages, !"kernel", i32 1}
!1 = !{void (i64, i64, i64, i64, i32, i32, i64)* @dpm_copy_pages, !"maxntidx", i32 256}
!2 = !{void (i64)* @dpm_spin, !"kernel", i32 1}
!3 = !{void (i64, i64)* @dpm_wait, !"kernel", i32 1}
!4 = !{void (i64, i64)* @dpm_zero, !"kernel", i32 1}
!5 = !{void (i64, i64)* @dpm_zero, !"maxntidx", i32 256}
