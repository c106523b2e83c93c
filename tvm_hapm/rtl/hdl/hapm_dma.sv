// The DMA engines (docs/isa.md, "LOAD" and "STORE").  DRAM is reached through a memory port of
// BEAT_BYTES bytes per beat with AXI-style valid/ready channels: a read request (byte address,
// beats) is answered by that many beats in request order; a write request is followed by its
// beats and answered by one response.  Every transfer is a whole number of beats: tvm_hapm.rtl
// refuses configs where a buffer entry is not (params.check_config).
`include "hapm_config.svh"

// The DRAM requests of a LOAD or STORE: one per row, y_size of them, each of x_size entries of
// 2^eshift bytes, at the slot's base + (dram_addr + row * x_stride) * 2^eshift, sent as fast as
// the channel takes them.  The row's first entry is kept as a running sum (one adder, no
// multiplier) and entry sizes are powers of two (params.check_config).  `start` takes the
// instruction's fields; y_size and x_size stay readable for the engine.
module hapm_row_requests (
    input  logic                          clk,
    input  logic                          rst,
    input  logic                          start,
    input  logic [`HAPM_INSN_BITS-1:0]                  insn,
    input  logic [`HAPM_SLOTS*32-1:0]              slot_base,
    input  logic [4:0]                    eshift,
    output logic                          valid,
    input  logic                          ready,
    output logic [31:0]                   addr,
    output logic [23:0]                   beats,
    output logic [11:0]                   y_size,
    output logic [11:0]                   x_size
);
  logic [31:0] entry_q, base_q;  // entry_q: the current row's first DRAM entry
  logic [15:0] stride_q;
  logic [11:0] row;
  assign addr = base_q + (entry_q << eshift);
  assign beats = 24'(32'(x_size) << (eshift - 5'(`HAPM_BEAT_SHIFT)));
  always_ff @(posedge clk) begin
    if (rst) valid <= 1'b0;
    else if (start) begin
      valid <= 1'b1;
      entry_q <= 32'(insn[`HAPM_MEM_DRAM_ADDR_LO +: `HAPM_MEM_DRAM_ADDR_W]);
      y_size <= insn[`HAPM_MEM_Y_SIZE_LO +: `HAPM_MEM_Y_SIZE_W];
      x_size <= insn[`HAPM_MEM_X_SIZE_LO +: `HAPM_MEM_X_SIZE_W];
      stride_q <= insn[`HAPM_MEM_X_STRIDE_LO +: `HAPM_MEM_X_STRIDE_W];
      base_q <= slot_base[insn[`HAPM_MEM_DRAM_SLOT_LO +: `HAPM_MEM_DRAM_SLOT_W]*32 +: 32];
      row <= '0;
    end else if (valid && ready) begin
      row <= row + 12'd1;
      entry_q <= entry_q + 32'(stride_q);
      if (row == y_size - 12'd1) valid <= 1'b0;
    end
  end
endmodule

// LOAD: y_size rows of x_size entries from DRAM, written with their padding to a buffer, one
// entry per cycle in row-major order of the padded region.  Row requests go out as fast as the
// port takes them; a data entry is written when its beats have arrived, a padding entry at once.
module hapm_dma_load (
    input  logic                          clk,
    input  logic                          rst,
    input  logic                          start,
    input  logic [`HAPM_INSN_BITS-1:0]                  insn,
    input  logic [`HAPM_SLOTS*32-1:0]              slot_base,
    output logic                          busy,
    output logic                          done,
    // read channel
    output logic                          ar_valid,
    input  logic                          ar_ready,
    output logic [31:0]                   ar_addr,
    output logic [23:0]                   ar_beats,
    input  logic                          r_valid,
    output logic                          r_ready,
    input  logic [`HAPM_BEAT_BITS-1:0]    r_data,
    // buffer write: raw entry (inp / wgt) and the same entry sign-extended to int32 lanes (acc)
    output logic                          wr_en,
    output logic [1:0]                    wr_buf,
    output logic [17:0]                   wr_addr,
    output logic [`HAPM_MAX_ENTRY_BYTES*8-1:0] wr_raw,
    output logic [`HAPM_ACC_BITS-1:0]     wr_acc
);
  localparam int C = `HAPM_C, BB = `HAPM_BEAT_BYTES, EB = `HAPM_MAX_ENTRY_BYTES;

  // ---- instruction fields
  logic [1:0]  buf_q, code_q;
  logic        pad_min_q;
  logic [11:0] y_q, x_q;
  logic [3:0]  pt_q, pl_q;

  // log2 of the bytes of one DRAM entry of the target buffer: E elements (a power of two) of
  // the DRAM element width (code 0, 1, 2: 1, 2, 4 bytes)
  function automatic logic [4:0] entry_shift(input logic [1:0] b, input logic [1:0] code);
    logic [4:0] e;
    e = b == `HAPM_BUF_INP ? 5'(`HAPM_R_SHIFT) :
        b == `HAPM_BUF_WGT ? 5'(`HAPM_R_SHIFT + `HAPM_C_SHIFT) : 5'(`HAPM_C_SHIFT);
    entry_shift = e + 5'(code);
  endfunction
  logic [4:0]  eshift;
  logic [31:0] ebeats;
  assign eshift = entry_shift(buf_q, code_q);
  assign ebeats = 32'(1) << (eshift - 5'(`HAPM_BEAT_SHIFT));

  // ---- request side: one request per row
  hapm_row_requests requests (
      .clk(clk), .rst(rst), .start(start), .insn(insn), .slot_base(slot_base),
      .eshift(eshift), .valid(ar_valid), .ready(ar_ready), .addr(ar_addr),
      .beats(ar_beats), .y_size(y_q), .x_size(x_q));

  // ---- data side: assemble one entry from its beats
  logic [EB*8-1:0] entry;
  logic [15:0]     beat;       // beats of the entry received
  logic            have_entry; // a whole entry waits to be written
  // a beat may arrive in the cycle the held entry is written
  assign r_ready = busy && (!have_entry || data_now);

  // ---- writer: walks the padded region
  logic [15:0] rows_total, cols_total, yy, xx;
  logic [17:0] addr;
  logic        in_data, pad_now, data_now;
  assign in_data = yy >= 16'(pt_q) && yy < 16'(pt_q) + 16'(y_q) &&
                   xx >= 16'(pl_q) && xx < 16'(pl_q) + 16'(x_q);
  assign pad_now = busy && !in_data;
  assign data_now = busy && in_data && have_entry;

  // the padding value: 0, or the minimum of the DRAM element type (of 1 << code_q bytes,
  // little-endian: 0x80 in its top byte, 0 in the others; picking its bytes with a modulo by
  // 1 << code_q cost Yosys 180 k LUTs)
  logic [EB*8-1:0] pad_raw;
  logic [1:0]      top_byte;
  assign top_byte = 2'((1 << code_q) - 1);
  always_comb
    for (int k = 0; k < EB; k++)
      pad_raw[k*8 +: 8] = (pad_min_q && code_q != 2'd3 && (2'(k) & top_byte) == top_byte) ?
                          8'h80 : 8'h00;

  logic [EB*8-1:0] raw;
  assign raw = in_data ? entry : pad_raw;
  always_comb begin
    wr_en = pad_now || data_now;
    wr_buf = buf_q;
    wr_addr = addr;
    wr_raw = raw;
    for (int c = 0; c < C; c++)
      case (code_q)
        2'd0: wr_acc[c*32 +: 32] = 32'(signed'(raw[c*8 +: 8]));
        2'd1: wr_acc[c*32 +: 32] = 32'(signed'(raw[c*16 +: 16]));
        default: wr_acc[c*32 +: 32] = raw[c*32 +: 32];
      endcase
  end

  always_ff @(posedge clk) begin
    done <= 1'b0;
    if (rst) begin
      busy <= 1'b0;
      have_entry <= 1'b0;
    end else if (start) begin
      busy <= 1'b1;
      buf_q <= insn[`HAPM_MEM_BUFFER_LO +: 2];
      code_q <= insn[`HAPM_MEM_ELEM_BITS_CODE_LO +: 2];
      pad_min_q <= insn[`HAPM_MEM_PAD_MIN_LO];
      pt_q <= insn[`HAPM_MEM_Y_PAD_TOP_LO +: 4];
      pl_q <= insn[`HAPM_MEM_X_PAD_LEFT_LO +: 4];
      rows_total <= 16'(insn[`HAPM_MEM_Y_PAD_TOP_LO +: 4]) + 16'(insn[`HAPM_MEM_Y_SIZE_LO +: 12])
                    + 16'(insn[`HAPM_MEM_Y_PAD_BOTTOM_LO +: 4]);
      cols_total <= 16'(insn[`HAPM_MEM_X_PAD_LEFT_LO +: 4]) + 16'(insn[`HAPM_MEM_X_SIZE_LO +: 12])
                    + 16'(insn[`HAPM_MEM_X_PAD_RIGHT_LO +: 4]);
      addr <= insn[`HAPM_MEM_SRAM_ADDR_LO +: 18];
      beat <= '0;
      have_entry <= 1'b0;
      yy <= '0;
      xx <= '0;
    end else if (busy) begin
      if (wr_en) begin
        if (data_now) have_entry <= 1'b0;
        addr <= addr + 18'd1;
        if (xx == cols_total - 16'd1) begin
          xx <= '0;
          yy <= yy + 16'd1;
          if (yy == rows_total - 16'd1) begin
            busy <= 1'b0;
            done <= 1'b1;
          end
        end else xx <= xx + 16'd1;
      end
      if (r_valid && r_ready) begin  // after the writer: a completed entry wins over its clear
        // one enable per beat of the entry (not a part-select at the 32-bit offset beat*BB*8)
        for (int k = 0; k < `HAPM_MAX_ENTRY_BEATS; k++)
          if (32'(beat) == k) entry[k*BB*8 +: BB*8] <= r_data;
        if (32'(beat) == ebeats - 1) begin
          beat <= '0;
          have_entry <= 1'b1;
        end else beat <= beat + 16'd1;
      end
    end
  end
endmodule

// STORE: y_size rows of x_size accumulator entries, each lane narrowed with saturation to the
// DRAM element width, written to DRAM row by row; done when every write is acknowledged.
module hapm_dma_store (
    input  logic                          clk,
    input  logic                          rst,
    input  logic                          start,
    input  logic [`HAPM_INSN_BITS-1:0]                  insn,
    input  logic [`HAPM_SLOTS*32-1:0]              slot_base,
    output logic                          busy,
    output logic                          done,
    output logic                          aw_valid,
    input  logic                          aw_ready,
    output logic [31:0]                   aw_addr,
    output logic [23:0]                   aw_beats,
    output logic                          w_valid,
    input  logic                          w_ready,
    output logic [`HAPM_BEAT_BITS-1:0]    w_data,
    input  logic                          b_valid,
    output logic                          b_ready,
    output logic [`HAPM_ACC_AW-1:0]       acc_raddr,
    input  logic [`HAPM_ACC_BITS-1:0]     acc_rdata
);
  localparam int C = `HAPM_C, BB = `HAPM_BEAT_BYTES, VB = `HAPM_ACC_BITS;

  logic [1:0]  code_q;
  logic [31:0] ebeats, total;
  logic [4:0]  eshift;  // log2 of an entry's DRAM bytes: C elements (a power of two)
  logic [11:0] y_q, x_q, acks;  // (x_q: the entries per row are counted in `total`)
  assign eshift = 5'(`HAPM_C_SHIFT) + 5'(code_q);
  assign ebeats = 32'(1) << (eshift - 5'(`HAPM_BEAT_SHIFT));
  assign b_ready = 1'b1;
  hapm_row_requests requests (
      .clk(clk), .rst(rst), .start(start), .insn(insn), .slot_base(slot_base),
      .eshift(eshift), .valid(aw_valid), .ready(aw_ready), .addr(aw_addr),
      .beats(aw_beats), .y_size(y_q), .x_size(x_q));

  // Entries are read ahead into a two-entry queue so that beats leave back to back.
  logic [31:0] rd_next;       // entries read so far
  logic [1:0]  queued;        // entries read and not yet sent (including the one in flight)
  logic        rd_pending;    // a read was made last cycle
  logic [VB-1:0] q0, q1;      // q0: the entry being sent
  logic [15:0] beat;
  logic        do_read;
  logic [17:0] insn_sram_q;
  logic        pop;           // the last beat of q0 leaves this cycle
  assign acc_raddr = `HAPM_ACC_AW'(32'(insn_sram_q) + rd_next);
  assign pop = w_valid && w_ready && 32'(beat) == ebeats - 1;
  // read when the entry will have a place: two places, one freed by this cycle's pop
  assign do_read = busy && rd_next < total &&
                   32'(queued) + 32'(rd_pending) < 32'(2) + 32'(pop);

  // lanes narrowed with saturation to the element width, packed little-endian
  function automatic logic [VB-1:0] narrow(input logic [VB-1:0] v, input logic [1:0] code);
    logic [VB-1:0] out;
    logic signed [31:0] x, lo, hi;
    out = '0;
    lo = code == 2'd0 ? -32'sd128 : code == 2'd1 ? -32'sd32768 : 32'h8000_0000;
    hi = code == 2'd0 ? 32'sd127 : code == 2'd1 ? 32'sd32767 : 32'h7fff_ffff;
    for (int c = 0; c < C; c++) begin
      x = v[c*32 +: 32];
      x = x < lo ? lo : x > hi ? hi : x;
      case (code)
        2'd0: out[c*8 +: 8] = x[7:0];
        2'd1: out[c*16 +: 16] = x[15:0];
        default: out[c*32 +: 32] = x;
      endcase
    end
    narrow = out;
  endfunction

  assign w_valid = busy && queued != 0;
  assign w_data = q0[beat*BB*8 +: BB*8];

  always_ff @(posedge clk) begin
    done <= 1'b0;
    if (rst) begin
      busy <= 1'b0;
    end else if (start) begin
      busy <= 1'b1;
      code_q <= insn[`HAPM_MEM_ELEM_BITS_CODE_LO +: 2];
      insn_sram_q <= insn[`HAPM_MEM_SRAM_ADDR_LO +: `HAPM_MEM_SRAM_ADDR_W];
      total <= 32'(insn[`HAPM_MEM_Y_SIZE_LO +: 12]) * 32'(insn[`HAPM_MEM_X_SIZE_LO +: 12]);
      acks <= '0;
      rd_next <= '0;
      queued <= '0;
      rd_pending <= 1'b0;
      beat <= '0;
    end else if (busy) begin
      // read ahead
      rd_pending <= do_read;
      if (do_read) rd_next <= rd_next + 1;
      // send beats; the queue shifts when the last beat of q0 leaves
      begin
        logic [1:0] n;
        n = queued;
        if (w_valid && w_ready) beat <= pop ? '0 : beat + 16'd1;
        if (pop) begin
          q0 <= q1;
          n = n - 2'd1;
        end
        if (rd_pending) begin
          if (n == 0) q0 <= narrow(acc_rdata, code_q);
          else q1 <= narrow(acc_rdata, code_q);
          n = n + 2'd1;
        end
        queued <= n;
      end
      if (b_valid && b_ready) begin
        acks <= acks + 12'd1;
        if (acks == y_q - 12'd1) begin
          busy <= 1'b0;
          done <= 1'b1;
        end
      end
    end
  end
endmodule
