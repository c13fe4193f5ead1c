// drm-pagemap-cuda: the gather/scatter kernel, compiled with NVRTC at first use.
// kernels/pages.ll is the same kernel in LLVM IR; kernels/pages.ptx (generated from it by
// kernels/regen.sh) is loaded when NVRTC is missing or its PTX does not load.
//
// A copy call moves `n` pages of one size. Entry e: the executor's own page starts at
// own_base + pfns[e] * 4096, the other side at addrs[e] (0: skip). Work is split into 4 KiB
// items (a page of 2^item_shift items); one warp copies one item: 8 loads of 16 bytes per
// lane in flight, then 8 stores. to_own != 0: other -> own (copy_to_devmem), else own -> other.
// abort: 0, or the address of a gate word (see dpm_wait); when it reads ABORT the call's
// pre-fence failed and nothing is copied.
typedef unsigned long long u64;
typedef unsigned int u32;

#define DPM_ABORT 2u

// One warp copies 4 KiB item `item` of entry `e` (own page `pfn`, other side `other`).
__device__ __forceinline__ void dpm_copy_item(u64 item, u32 item_shift, u32 pfn, u64 other,
                                              u64 own_base, u32 to_own, u32 lane)
{
    u64 sub = (item & ((1ull << item_shift) - 1)) << 12;
    u64 own = own_base + ((u64)pfn << 12) + sub;
    other += sub;
    const uint4* src = (const uint4*)(to_own ? other : own);
    uint4* dst = (uint4*)(to_own ? own : other);
    uint4 v[8];
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] = src[lane + 32 * k];
#pragma unroll
    for (int k = 0; k < 8; k++) dst[lane + 32 * k] = v[k];
}

extern "C" __global__ void __launch_bounds__(256)
dpm_copy_pages(const u32* pfns, const u64* addrs, u64 n_items, u64 own_base, u32 item_shift, u32 to_own,
               const volatile u32* abort)
{
    if (abort != 0 && *abort == DPM_ABORT) return;
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    u32 lane = threadIdx.x & 31;
    for (u64 item = warp; item < n_items; item += nwarps) {
        u64 e = item >> item_shift;
        u64 other = addrs[e];
        if (other != 0) dpm_copy_item(item, item_shift, pfns[e], other, own_base, to_own, lane);
    }
}

// The same copy with Hopper's bulk copies (sm_90 and later; NVRTC builds only, option
// cuda.bulk): lane 0 of each warp moves its 4 KiB item with one cp.async.bulk from the source
// into a 4 KiB buffer in shared memory (completion counted in bytes on an mbarrier) and one
// cp.async.bulk from there to the destination, instead of 8 x 16-byte loads and stores per
// lane: the copy engine of the SM (TMA) issues the reads, in larger requests. Same parameters
// as dpm_copy_pages.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
extern "C" __global__ void __launch_bounds__(256)
dpm_copy_pages_bulk(const u32* pfns, const u64* addrs, u64 n_items, u64 own_base, u32 item_shift,
                    u32 to_own, const volatile u32* abort)
{
    __shared__ __align__(128) unsigned char buf[8][4096];
    __shared__ __align__(8) u64 bar[8];
    if (abort != 0 && *abort == DPM_ABORT) return;
    const u32 w = threadIdx.x >> 5;
    if ((threadIdx.x & 31) != 0) return;
    const u32 sbuf = (u32)__cvta_generic_to_shared(buf[w]);
    const u32 sbar = (u32)__cvta_generic_to_shared(&bar[w]);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sbar) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    u32 phase = 0;
    for (u64 item = warp; item < n_items; item += nwarps) {
        const u64 e = item >> item_shift;
        u64 other = addrs[e];
        if (other == 0) continue;
        const u64 sub = (item & ((1ull << item_shift) - 1)) << 12;
        const u64 own = own_base + ((u64)pfns[e] << 12) + sub;
        other += sub;
        const u64 src = to_own ? other : own;
        const u64 dst = to_own ? own : other;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 4096;"
                     :: "r"(sbar) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                     " [%0], [%1], 4096, [%2];"
                     :: "r"(sbuf), "l"(src), "r"(sbar) : "memory");
        u32 ready = 0;
        while (!ready) {
            asm volatile("{\n\t.reg .pred p;\n\t"
                         "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                         "selp.u32 %0, 1, 0, p;\n\t}"
                         : "=r"(ready) : "r"(sbar), "r"(phase) : "memory");
        }
        phase ^= 1;
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], 4096;"
                     :: "l"(dst), "r"(sbuf) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        // The buffer is free again once the store has read it.
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    }
    // Every store complete before the kernel is.
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
#endif

// The same copy for calls of at most DPM_SMALL entries, with the page lists passed by value
// as a kernel parameter: no staging buffer, and no read of the lists across the bus before
// the first byte moves (the small calls of GPU faults are latency-bound). Not in pages.ll:
// with the fallback PTX, small calls take dpm_copy_pages.
#define DPM_SMALL 64
struct dpm_small_lists {
    u64 addrs[DPM_SMALL];
    u32 pfns[DPM_SMALL];
};

extern "C" __global__ void __launch_bounds__(256)
dpm_copy_small(const dpm_small_lists lists, u64 n_items, u64 own_base, u32 item_shift, u32 to_own)
{
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    u32 lane = threadIdx.x & 31;
    for (u64 item = warp; item < n_items; item += nwarps) {
        u64 e = item >> item_shift;
        u64 other = lists.addrs[e];
        if (other != 0) dpm_copy_item(item, item_shift, lists.pfns[e], other, own_base, to_own, lane);
    }
}

// The persistent copy kernel of the ring (src/ring): one block polls a ring of descriptors in
// pinned host memory and copies each as dpm_copy_small would, completing through the ring's
// `done` word, which the CPU polls. No atomics on host memory (none across PCIe): each side
// writes its own words. Layout as src/ring/layout.rs (a unit test compares the numbers).
// pages.ll has the same kernel (so the fallback PTX has it too).
#define DPM_RING_SLOTS 64
#define DPM_RING_THREADS 512
#define DPM_SEQ_RETRIES (1u << 20)
struct dpm_ring_header {
    u64 head;     // CPU: newest published seq
    u64 stop;     // CPU: instances of an epoch <= stop return once idle
    u64 cpu_pad[6];
    u64 done;     // kernel: newest completed seq
    u64 alive;    // kernel: epoch of the instance that started last
    u64 exited;   // kernel: epoch of the instance that returned last
    u64 fault;    // kernel: seq of a torn descriptor (its seq word never matched)
    // kernel (NVRTC builds): %globaltimer ns summed over copies, for profiles: head seen ->
    // slot loaded, slot loaded -> bytes copied and visible, -> `done` written; copies timed.
    u64 clocks[4];
};
struct dpm_ring_desc {
    u64 seq;      // written last by the CPU: the slot holds this seq
    u64 own_base;
    u32 n_entries;
    u32 item_shift;
    u32 to_own;
    u32 pad;
    u64 addrs[DPM_SMALL];
    u32 pfns[DPM_SMALL];
};
static_assert(sizeof(dpm_ring_desc) == 800, "ring descriptor");
static_assert(sizeof(dpm_ring_header) == 128, "ring header");

__device__ __forceinline__ u64 dpm_globaltimer()
{
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// dpm_copy_item with loads that never hit a cached line: the kernel lives across many
// copies, and a line of system memory it read before may have changed since.
__device__ __forceinline__ void dpm_copy_item_cv(u64 item, u32 item_shift, u32 pfn, u64 other,
                                                 u64 own_base, u32 to_own, u32 lane)
{
    u64 sub = (item & ((1ull << item_shift) - 1)) << 12;
    u64 own = own_base + ((u64)pfn << 12) + sub;
    other += sub;
    const uint4* src = (const uint4*)(to_own ? other : own);
    uint4* dst = (uint4*)(to_own ? own : other);
    uint4 v[8];
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] = __ldcv(src + lane + 32 * k);
#pragma unroll
    for (int k = 0; k < 8; k++) dst[lane + 32 * k] = v[k];
}

// One instance of epoch `epoch` (launched with DPM_RING_THREADS threads, one block, on a
// stream of its own): resumes after `done`; thread 0 polls `head`, the block loads the slot
// (its seq word with it) into shared memory, takes it only if the seq word says `next`,
// copies it (one warp per 4 KiB item), makes the bytes visible to the system, then thread 0
// publishes `done`. Returns when idle with `stop >= epoch` (read every 16th empty poll: each
// read of host memory is a PCIe round trip), when `lease_ns` of %globaltimer have passed
// (busy or not: the CPU relaunches for what is left), or when a slot's seq word never
// matches (`fault`); writes `exited` last.
extern "C" __global__ void __launch_bounds__(DPM_RING_THREADS)
dpm_ring(dpm_ring_header* ring, u64 epoch, u64 lease_ns)
{
    volatile dpm_ring_header* h = ring;
    const dpm_ring_desc* slots = (const dpm_ring_desc*)(ring + 1);
    __shared__ __align__(16) dpm_ring_desc d;
    __shared__ u64 s_next;
    __shared__ u32 s_exit;
    const u32 tid = threadIdx.x;
    const u64 t0 = dpm_globaltimer();
    // Thread 0's phase clocks (see dpm_ring_header::clocks), carried over from the last
    // instance: read once at start, written (never read) after each copy.
    u64 c_slot = 0, c_copy = 0, c_done = 0, c_n = 0, t_seen = 0;
    if (tid == 0) {
        h->alive = epoch;
        __threadfence_system();
        u64 done = h->done;
        s_next = done == ~0ull ? done : done + 1;
        c_slot = h->clocks[0];
        c_copy = h->clocks[1];
        c_done = h->clocks[2];
        c_n = h->clocks[3];
    }
    __syncthreads();
    u64 next = s_next;
    u32 tries = 0;
    for (;;) {
        if (tid == 0) {
            u32 quit = 0, polls = 0;
            for (;;) {
                if (dpm_globaltimer() - t0 >= lease_ns) { quit = 1; break; }
                if (next != ~0ull && h->head >= next) break;
                if ((++polls & 15) == 0 && h->stop >= epoch) { quit = 1; break; }
            }
            // The slot's loads after head's.
            __threadfence_system();
            t_seen = dpm_globaltimer();
            s_exit = quit;
        }
        __syncthreads();
        if (s_exit) break;
        if (tid < sizeof(dpm_ring_desc) / 16)
            ((uint4*)&d)[tid] = __ldcv((const uint4*)&slots[next % DPM_RING_SLOTS] + tid);
        __syncthreads();
        if (d.seq != next) {
            // Not (yet) this seq: load it again, a bounded number of times.
            if (++tries == DPM_SEQ_RETRIES) {
                if (tid == 0) h->fault = next;
                break;
            }
            __syncthreads();
            continue;
        }
        tries = 0;
        const u64 t_slot = dpm_globaltimer();
        const u64 n_items = (u64)d.n_entries << d.item_shift;
        const u32 lane = tid & 31;
        for (u64 item = tid >> 5; item < n_items; item += DPM_RING_THREADS / 32) {
            u64 e = item >> d.item_shift;
            u64 other = d.addrs[e];
            if (other != 0) dpm_copy_item_cv(item, d.item_shift, d.pfns[e], other, d.own_base, d.to_own, lane);
        }
        // Every thread's stores visible to the system before `done` says so.
        __threadfence_system();
        __syncthreads();
        if (tid == 0) {
            const u64 t_copy = dpm_globaltimer();
            h->done = next;
            __threadfence_system();
            c_slot += t_slot - t_seen;
            c_copy += t_copy - t_slot;
            c_done += dpm_globaltimer() - t_copy;
            c_n += 1;
            h->clocks[0] = c_slot;
            h->clocks[1] = c_copy;
            h->clocks[2] = c_done;
            h->clocks[3] = c_n;
        }
        next++;
    }
    if (tid == 0) {
        __threadfence_system();
        h->exited = epoch;
        __threadfence_system();
    }
}

// Zeroes `bytes` (a multiple of 16) at `dst`: the clear of new allocations. A kernel rather
// than cuMemsetD*Async, which the driver may serialise against every stream of the device.
extern "C" __global__ void __launch_bounds__(256) dpm_zero(u64 dst, u64 bytes)
{
    uint4* d = (uint4*)dst;
    u64 n = bytes >> 4;
    uint4 z = make_uint4(0, 0, 0, 0);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        d[i] = z;
}

// Busy-waits at least `ns` nanoseconds of GPU time by %globaltimer and at least `ns` SM
// cycles (benches hold a stream with it while they queue work).
extern "C" __global__ void dpm_spin(u64 ns)
{
    u64 t0, t;
    long long c0 = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns || (u64)(clock64() - c0) < ns);
}

// Holds a stream until the host writes a non-zero word at `flag` (pinned, mapped host
// memory), or `max_cycles` SM cycles pass (0: no limit). Host pre-fences and tests use it.
extern "C" __global__ void dpm_wait(const volatile u32* flag, u64 max_cycles)
{
    long long c0 = clock64();
    while (*flag == 0) {
        if (max_cycles != 0 && (u64)(clock64() - c0) >= max_cycles) break;
    }
}
