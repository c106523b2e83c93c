// Verilator test bench of hapm_top: runs one program against a DRAM model and writes the DRAM
// slots back.  Driven from Python (tvm_hapm/rtl/cosim.py) through two files:
//
//   job    "HAPMJOB1", u32 dram_latency, u64 max_cycles, u32 n_insn, the instructions,
//          u32 n_slots, then per slot: u32 bytes, the bytes
//   result "HAPMRES1", u32 status (0 done, 1 cycle limit, 2 error flag, 3 DRAM access out of
//          the slots), u64 cycles, u64 gemms_bypassed, u32 n_slots, per slot: u32 bytes, bytes,
//          u32 n_insn, per instruction: u64 start, u64 end (cycles after start; end exclusive;
//          a GEMM starts when the compute module issues it and ends when its array is free)
//
// The DRAM model: the read channel answers each request, in order, with its beats, the first
// dram_latency cycles after the request was accepted and never before the previous request's
// last beat (one beat per cycle); the write channel takes one beat per cycle and acknowledges a
// request dram_latency cycles after its last beat.  All integers are little-endian.
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <deque>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "Vhapm_top.h"
#include "verilated.h"

namespace {

// Byte access to a Verilator signal of any width.
template <typename T>
void put_bytes(T& sig, const uint8_t* src, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n && i < sizeof(T); ++i) v |= uint64_t(src[i]) << (8 * i);
  sig = static_cast<T>(v);
}
template <std::size_t W>
void put_bytes(VlWide<W>& sig, const uint8_t* src, size_t n) {
  for (std::size_t w = 0; w < W; ++w) {
    uint32_t v = 0;
    for (int b = 0; b < 4; ++b) {
      size_t i = 4 * w + b;
      if (i < n) v |= uint32_t(src[i]) << (8 * b);
    }
    sig[w] = v;
  }
}
template <typename T>
void get_bytes(const T& sig, uint8_t* dst, size_t n) {
  uint64_t v = static_cast<uint64_t>(sig);
  for (size_t i = 0; i < n; ++i) dst[i] = i < sizeof(T) ? uint8_t(v >> (8 * i)) : 0;
}
template <std::size_t W>
void get_bytes(const VlWide<W>& sig, uint8_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = uint8_t(sig[i / 4] >> (8 * (i % 4)));
}

struct Request {
  uint64_t addr, beats, accepted;
};

template <typename T>
T read_le(std::ifstream& in) {
  T v{};
  in.read(reinterpret_cast<char*>(&v), sizeof(T));
  if (!in) throw std::runtime_error("truncated job file");
  return v;
}
template <typename T>
void write_le(std::ofstream& out, T v) {
  out.write(reinterpret_cast<const char*>(&v), sizeof(T));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s JOB RESULT\n", argv[0]);
    return 2;
  }
  const size_t beat = HAPM_BEAT_BYTES;
  std::ifstream in(argv[1], std::ios::binary);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "HAPMJOB1", 8) != 0) {
    std::fprintf(stderr, "%s: not a job file\n", argv[1]);
    return 2;
  }
  const uint32_t latency = read_le<uint32_t>(in);
  const uint64_t max_cycles = read_le<uint64_t>(in);
  const uint32_t n_insn = read_le<uint32_t>(in);
  std::vector<uint8_t> program(size_t(n_insn) * HAPM_INSN_BYTES);
  in.read(reinterpret_cast<char*>(program.data()), program.size());
  const uint32_t n_slots = read_le<uint32_t>(in);
  if (n_slots > HAPM_SLOTS) {
    std::fprintf(stderr, "at most %d slots\n", HAPM_SLOTS);
    return 2;
  }
  // Slots live in one DRAM, 4 KiB aligned, after a first unused page (address 0 is no slot).
  std::vector<uint64_t> base(HAPM_SLOTS, 0), size(HAPM_SLOTS, 0);
  std::vector<std::vector<uint8_t>> contents(n_slots);
  uint64_t top_addr = 4096;
  for (uint32_t s = 0; s < n_slots; ++s) {
    size[s] = read_le<uint32_t>(in);
    contents[s].resize(size[s]);
    in.read(reinterpret_cast<char*>(contents[s].data()), size[s]);
    if (!in) {
      std::fprintf(stderr, "truncated slot %u\n", s);
      return 2;
    }
    base[s] = top_addr;
    top_addr += (size[s] + 4095) / 4096 * 4096 + 4096;
  }
  std::vector<uint8_t> dram(top_addr, 0);
  for (uint32_t s = 0; s < n_slots; ++s)
    std::copy(contents[s].begin(), contents[s].end(), dram.begin() + base[s]);
  auto in_slots = [&](uint64_t addr, uint64_t n) {
    for (uint32_t s = 0; s < n_slots; ++s)
      if (addr >= base[s] && addr + n <= base[s] + size[s]) return true;
    return false;
  };

  auto ctx = std::make_unique<VerilatedContext>();
  auto top = std::make_unique<Vhapm_top>(ctx.get());
  auto tick = [&]() {
    top->clk = 0;
    top->eval();
    top->clk = 1;
    top->eval();
  };
  top->rst = 1;
  top->start = 0;
  for (int i = 0; i < 4; ++i) tick();
  top->rst = 0;
  uint8_t bases[4 * HAPM_SLOTS] = {0};
  for (int s = 0; s < HAPM_SLOTS; ++s)
    for (int b = 0; b < 4; ++b) bases[4 * s + b] = uint8_t(base[s] >> (8 * b));
  put_bytes(top->slot_base, bases, sizeof bases);
  top->insn_count = n_insn;
  top->start = 1;
  tick();
  top->start = 0;

  std::deque<Request> reads, writes;
  std::deque<uint64_t> acks;  // cycle each write response becomes valid
  uint64_t read_beat = 0, read_next = 0, write_beat = 0, bus_free = 0;
  std::vector<uint8_t> imem_word(HAPM_INSN_BYTES, 0);
  uint32_t status = 0;
  uint64_t cycle = 0;
  std::vector<uint64_t> t_start(n_insn, ~0ull), t_end(n_insn, ~0ull);
  uint8_t idx_bytes[4 * (3 + HAPM_NUM_ARRAYS)];
  auto index_at = [&](int k) {
    return uint32_t(idx_bytes[4 * k]) | uint32_t(idx_bytes[4 * k + 1]) << 8 |
           uint32_t(idx_bytes[4 * k + 2]) << 16 | uint32_t(idx_bytes[4 * k + 3]) << 24;
  };
  const int n_end = 3 + HAPM_NUM_ARRAYS;
  while (!top->done) {
    if (cycle >= max_cycles) {
      status = 1;
      break;
    }
    // ---- inputs for this cycle
    put_bytes(top->imem_rdata, imem_word.data(), HAPM_INSN_BYTES);
    top->ar_ready = 1;
    top->aw_ready = 1;
    bool r_valid = false;
    if (!reads.empty()) {
      if (read_beat == 0) read_next = std::max(reads.front().accepted + latency, bus_free);
      if (cycle >= read_next) {
        r_valid = true;
        const uint64_t a = reads.front().addr + read_beat * beat;
        if (!in_slots(a, beat)) {
          status = 3;
          break;
        }
        put_bytes(top->r_data, dram.data() + a, beat);
      }
    }
    top->r_valid = r_valid;
    top->w_ready = !writes.empty();
    top->b_valid = !acks.empty() && acks.front() <= cycle;
    top->clk = 0;
    top->eval();
    // ---- handshakes at this cycle's rising edge
    if (top->ar_valid && top->ar_ready) reads.push_back({top->ar_addr, top->ar_beats, cycle});
    if (r_valid && top->r_ready) {
      read_next = cycle + 1;
      if (++read_beat == reads.front().beats) {
        reads.pop_front();
        read_beat = 0;
        bus_free = cycle + 1;
      }
    }
    if (top->aw_valid && top->aw_ready) writes.push_back({top->aw_addr, top->aw_beats, cycle});
    if (top->w_valid && top->w_ready) {
      const uint64_t a = writes.front().addr + write_beat * beat;
      if (!in_slots(a, beat)) {
        status = 3;
        break;
      }
      get_bytes(top->w_data, dram.data() + a, beat);
      if (++write_beat == writes.front().beats) {
        writes.pop_front();
        write_beat = 0;
        acks.push_back(cycle + latency);
      }
    }
    if (top->b_valid && top->b_ready) acks.pop_front();
    if (top->tr_start) {
      get_bytes(top->tr_start_idx, idx_bytes, 12);
      for (int m = 0; m < 3; ++m)
        if ((top->tr_start >> m) & 1 && index_at(m) < n_insn) t_start[index_at(m)] = cycle;
    }
    if (top->tr_end) {
      get_bytes(top->tr_end_idx, idx_bytes, 4 * n_end);
      for (int k = 0; k < n_end; ++k)
        if ((uint64_t(top->tr_end) >> k) & 1 && index_at(k) < n_insn)
          // a module is free the cycle after its instruction ends; an array in its done cycle
          t_end[index_at(k)] = k < 3 ? cycle + 1 : cycle;
    }
    const uint64_t pc = top->imem_addr;
    if (pc < n_insn)
      std::memcpy(imem_word.data(), program.data() + pc * HAPM_INSN_BYTES, HAPM_INSN_BYTES);
    else
      std::fill(imem_word.begin(), imem_word.end(), 0);
    top->clk = 1;
    top->eval();
    ++cycle;
  }
  if (status == 0 && top->error) status = 2;
  top->final();

  std::ofstream out(argv[2], std::ios::binary);
  out.write("HAPMRES1", 8);
  write_le<uint32_t>(out, status);
  write_le<uint64_t>(out, top->cycles);
  write_le<uint64_t>(out, top->gemms_bypassed);
  write_le<uint32_t>(out, n_slots);
  for (uint32_t s = 0; s < n_slots; ++s) {
    write_le<uint32_t>(out, uint32_t(size[s]));
    out.write(reinterpret_cast<const char*>(dram.data() + base[s]), size[s]);
  }
  write_le<uint32_t>(out, n_insn);
  for (uint32_t i = 0; i < n_insn; ++i) {
    write_le<uint64_t>(out, t_start[i]);
    write_le<uint64_t>(out, t_end[i]);
  }
  return out ? 0 : 2;
}
