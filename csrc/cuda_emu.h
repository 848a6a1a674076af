// cuda_emu.h -- a small CUDA execution emulator, so the kernels in csrc/*.cu compile for the host with g++ and run
// on the CPU (the CI path of guppy.csrc). Included only when __CUDACC__ is not defined (attention_host.cpp).
//
// What it provides
//   * __global__/__device__/__forceinline__/__host__ as no-ops, dim3, uint4, threadIdx/blockIdx/blockDim/gridDim
//     (thread_local; the fiber scheduler rewrites threadIdx on every switch).
//   * emu::half: IEEE binary16 storage with round-to-nearest-even float conversion (written out, no _Float16).
//   * emu::launch(grid, block, smem_bytes, fn): runs every block; a block's threads are cooperative fibers on one
//     OS thread, each with its own stack, scheduled round robin. Blocks are shared out over a few OS threads
//     (GUPPY_EMU_THREADS, default std::thread::hardware_concurrency()). Each block gets ONE dynamic shared buffer
//     (what `extern __shared__` is on the device), filled with 0xFF bytes (NaN as fp16 and fp32) so that a read of
//     shared memory nobody wrote shows up as NaN in the results instead of passing by luck.
//   * barriers: block_sync() (__syncthreads) and warp collectives. A warp collective (mma.sync, ldmatrix, shfl) is
//     one warp barrier: each lane deposits its operands in the warp's exchange area, the last lane to arrive runs the
//     collective for all 32 lanes (moving each element to the lane/register the PTX ISA tables give; that code is
//     in warp_ops.cuh), and every lane then reads its own result. Operands and results live in separate areas, so one
//     barrier per collective is enough: a lane cannot reach the next collective before it has read this one's result.
//   * a deadlock check: a scheduler sweep in which no fiber makes progress aborts the launch with a message
//     (e.g. a thread returned early while the others wait in __syncthreads).
//
// Why fibers and not std::thread + std::barrier: a warp collective is a barrier of 32 threads, and the attention
// kernels run a few hundred of them per tile; with OS threads every one is 32 futex wake-ups on 2 cores. A fiber switch
// here is a dozen instructions (hand-written x86-64 register swap; ucontext on other machines), so a collective costs
// ~1-2 us for the whole warp. Fibers of one block never run at the same time, which the device does not promise
// either: kernels must synchronise exactly as on the GPU, and the emulator checks that they do (barrier counts).
#pragma once
#ifndef __CUDACC__

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };

inline thread_local uint3_ threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace emu {

// ---------------------------------------------------------------------------------------------------------------
// fp16
// ---------------------------------------------------------------------------------------------------------------
struct half { uint16_t x; };

inline uint16_t float_to_half_bits(float f) {  // IEEE 754 binary32 -> binary16, round to nearest even
    uint32_t u; std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t absu = u & 0x7fffffffu;
    if (absu >= 0x7f800000u) return (uint16_t)(sign | (absu > 0x7f800000u ? 0x7e00u : 0x7c00u));  // NaN / inf
    if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (absu < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
        if (absu < 0x33000000u) return (uint16_t)sign;  // < 2^-25: rounds to 0 (2^-25 exactly ties to even 0)
        uint32_t e = absu >> 23, m = (absu & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)e;  // value = m * 2^(e-150); half subnormal unit 2^-24 -> m >> (126 - e)
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t e = (absu >> 23) - 112, m = absu & 0x7fffffu;  // rebias 127 -> 15
    uint32_t q = (e << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1))) q++;  // carry into the exponent is the right answer
    return (uint16_t)(sign | q);
}

inline float half_bits_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
    if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) u = sign;
    else { float f = std::ldexp((float)m, -24); std::memcpy(&u, &f, 4); u |= sign; }
    float f; std::memcpy(&f, &u, 4); return f;
}

// ---------------------------------------------------------------------------------------------------------------
// fibers
// ---------------------------------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void guppy_emu_ctx_switch(void** save_sp, void* new_sp);
// callee-saved registers + mxcsr/x87 control word on the old stack, then the new stack pointer, then pop the same.
asm(R"(
.text
.globl guppy_emu_ctx_switch
.type guppy_emu_ctx_switch,@function
guppy_emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size guppy_emu_ctx_switch,.-guppy_emu_ctx_switch
)");
#endif

struct Scheduler;

struct Fiber {
    std::vector<unsigned char> stack;
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    unsigned tid = 0;
    bool done = false;
};

struct WarpX {              // one warp's exchange area for collectives
    uint32_t in[32][12];    // operands (up to 48 bytes per lane)
    uint32_t out[32][8];    // results
    const void* ptr[32];    // addresses (ldmatrix)
    int arrived = 0;
    unsigned gen = 0;
};

struct Scheduler {          // one per OS worker thread; runs one block at a time
    std::vector<Fiber> fibers;
    std::vector<WarpX> warps;
    std::vector<unsigned char> smem;
#if defined(__x86_64__)
    void* main_sp = nullptr;
#else
    ucontext_t main_ctx;
#endif
    const std::function<void()>* body = nullptr;
    unsigned cur = 0, nthreads = 0;
    int block_arrived = 0;
    unsigned block_gen = 0;
    uint64_t progress = 0;
};

inline thread_local Scheduler* tls_sched = nullptr;
constexpr size_t kStack = 96 * 1024;

inline void yield_to_scheduler() {
    Scheduler* s = tls_sched;
    Fiber& f = s->fibers[s->cur];
#if defined(__x86_64__)
    guppy_emu_ctx_switch(&f.sp, s->main_sp);
#else
    swapcontext(&f.ctx, &s->main_ctx);
#endif
}

inline void fiber_entry() {
    Scheduler* s = tls_sched;
    (*s->body)();
    s->fibers[s->cur].done = true;
    s->progress++;
    yield_to_scheduler();
    std::abort();  // a finished fiber is never resumed
}
#if !defined(__x86_64__)
inline void fiber_entry_uc() { fiber_entry(); }
#endif

inline void fiber_init(Fiber& f) {
    if (f.stack.size() < kStack) f.stack.resize(kStack);
    f.done = false;
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)f.stack.data() + f.stack.size()) & ~(uintptr_t)15;
    uint64_t* p = (uint64_t*)top;
    *--p = 0;                               // padding: the return-address slot below sits 16-aligned
    *--p = (uint64_t)(void (*)())fiber_entry;  // `ret` of the first switch lands in fiber_entry
    for (int i = 0; i < 6; ++i) *--p = 0;   // rbp rbx r12 r13 r14 r15
    *--p = (uint64_t)0x037F << 32 | 0x1F80;  // mxcsr (low), x87 control word (high)
    f.sp = p;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())fiber_entry_uc, 0);
#endif
}

// ---- barriers (called from fibers) ----
inline unsigned lane_id() { return threadIdx.x & 31; }  // kernels here use 1-D blocks

inline void block_sync() {
    Scheduler* s = tls_sched;
    unsigned g = s->block_gen;
    s->progress++;
    if (++s->block_arrived == (int)s->nthreads) { s->block_arrived = 0; s->block_gen++; return; }
    while (s->block_gen == g) yield_to_scheduler();
}

// Warp collective: deposit operands in w.in[lane] before calling; `fn(w)` runs once, in the last lane to arrive,
// and fills w.out; read w.out[lane] after.
template <class F>
inline void warp_collective(WarpX& w, F&& fn) {
    Scheduler* s = tls_sched;
    unsigned g = w.gen;
    s->progress++;
    unsigned nwarp_threads = s->nthreads - (threadIdx.x & ~31u);
    int need = nwarp_threads < 32 ? (int)nwarp_threads : 32;
    if (++w.arrived == need) { fn(w); w.arrived = 0; w.gen++; return; }
    while (w.gen == g) yield_to_scheduler();
}

inline WarpX& my_warp() { return tls_sched->warps[threadIdx.x >> 5]; }
inline unsigned char* block_smem() { return tls_sched->smem.data(); }

// ---- launcher ----
inline int worker_count(unsigned nblocks) {
    int n = (int)std::thread::hardware_concurrency();
    if (const char* e = std::getenv("GUPPY_EMU_THREADS")) n = std::atoi(e);
    if (n < 1) n = 1;
    if ((unsigned)n > nblocks) n = (int)nblocks;
    return n;
}

inline void run_blocks(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body,
                       std::atomic<unsigned>* next, unsigned nblocks, std::string* err) {
    Scheduler s;
    tls_sched = &s;
    s.nthreads = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1) { *err = "emulator: only 1-D thread blocks are supported"; return; }
    s.fibers.resize(s.nthreads);
    s.warps.resize((s.nthreads + 31) / 32);
    s.body = &body;
    gridDim = grid;
    blockDim = block;
    for (;;) {
        unsigned b = next->fetch_add(1);
        if (b >= nblocks || !err->empty()) break;
        blockIdx.x = b % grid.x; blockIdx.y = (b / grid.x) % grid.y; blockIdx.z = b / (grid.x * grid.y);
        s.smem.assign(smem_bytes ? smem_bytes : 16, 0xFF);
        for (unsigned t = 0; t < s.nthreads; ++t) { s.fibers[t].tid = t; fiber_init(s.fibers[t]); }
        for (auto& w : s.warps) { w.arrived = 0; w.gen = 0; }
        s.block_arrived = 0; s.block_gen = 0;
        unsigned alive = s.nthreads;
        while (alive) {
            uint64_t before = s.progress;
            for (unsigned t = 0; t < s.nthreads; ++t) {
                Fiber& f = s.fibers[t];
                if (f.done) continue;
                s.cur = t;
                threadIdx.x = t; threadIdx.y = 0; threadIdx.z = 0;
#if defined(__x86_64__)
                guppy_emu_ctx_switch(&s.main_sp, f.sp);
#else
                swapcontext(&s.main_ctx, &f.ctx);
#endif
                if (f.done) --alive;
            }
            if (alive && s.progress == before) {
                char buf[160];
                std::snprintf(buf, sizeof buf, "emulator: deadlock in block (%u,%u,%u): %u threads wait at a barrier "
                              "that the others never reach", blockIdx.x, blockIdx.y, blockIdx.z, alive);
                *err = buf;
                break;  // the blocked fibers' stacks are abandoned (reinitialised on the next launch)
            }
        }
        if (!err->empty()) break;
    }
    tls_sched = nullptr;
}

// Run `body` (the kernel call with its arguments bound) as grid x block threads.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
    unsigned nblocks = grid.x * grid.y * grid.z;
    if (!nblocks) return;
    std::atomic<unsigned> next{0};
    int nw = worker_count(nblocks);
    std::vector<std::string> errs(nw);
    if (nw == 1) {
        run_blocks(grid, block, smem_bytes, body, &next, nblocks, &errs[0]);
    } else {
        std::vector<std::thread> th;
        for (int i = 0; i < nw; ++i)
            th.emplace_back(run_blocks, grid, block, smem_bytes, std::cref(body), &next, nblocks, &errs[i]);
        for (auto& t : th) t.join();
    }
    for (auto& e : errs) if (!e.empty()) throw std::runtime_error(e);
}

}  // namespace emu

// The kernel-launch spelling used by the launchers in the .cu files: KERNEL_LAUNCH(kern, grid, block, smem, stream, args...)
#define GUPPY_LAUNCH(kern, grid, block, smem, stream, ...) \
    ::emu::launch((grid), (block), (smem), [&]() { kern(__VA_ARGS__); })

#endif  // !__CUDACC__
