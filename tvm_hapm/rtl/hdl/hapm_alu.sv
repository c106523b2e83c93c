// The vector ALU of the compute module (docs/isa.md, "ALU"): one accumulator vector per cycle
// over the outer x inner loop nest, C lanes in parallel.
//
// Pipeline: cycle j presents iteration j's addresses (destination, source) to the
// accumulator's two read ports; cycle j + 1 computes from the data (forwarding the results of
// iterations j - 1 and j - 2, which the reads could not see yet, so that an iteration sees what
// earlier ones wrote, as the ISA requires: reductions into one entry); cycle j + 2 writes.
// ADD_REQUANT's multiplier (entry source + 1, the same for every iteration: the ISA requires
// src_so = src_si = 0 and no write to it) is read through the source port in the start cycle,
// before the loop's first address, and held.
`include "hapm_config.svh"

module hapm_alu (
    input  logic                       clk,
    input  logic                       rst,
    input  logic                       start,
    input  logic [2:0]                 i_op,
    input  logic                       i_use_imm,
    input  logic [15:0]                i_imm,
    input  logic [17:0]                i_dst,
    input  logic [17:0]                i_src,
    input  logic [9:0]                 i_outer,
    input  logic [9:0]                 i_inner,
    input  logic [13:0]                i_dst_so,
    input  logic [5:0]                 i_dst_si,
    input  logic [13:0]                i_src_so,
    input  logic [5:0]                 i_src_si,
    output logic                       busy,
    output logic                       done,
    output logic                       error,     // a SHR amount from acc outside [0, 31]
    output logic [2*`HAPM_ACC_AW-1:0]  acc_raddr, // {src, dst}
    input  logic [2*`HAPM_ACC_BITS-1:0] acc_rdata,
    output logic                       acc_we,
    output logic [`HAPM_ACC_AW-1:0]    acc_waddr,
    output logic [`HAPM_ACC_BITS-1:0]  acc_wdata
);
  localparam int C = `HAPM_C, AW = `HAPM_ACC_AW, VB = `HAPM_ACC_BITS;
  localparam logic signed [31:0] ACT_MIN = `HAPM_ACT_MIN, ACT_MAX = `HAPM_ACT_MAX;

  // ---- one lane: {error, result}
  function automatic logic [32:0] lane(input logic [2:0] op, input logic [15:0] imm,
                                       input logic signed [31:0] d,
                                       input logic signed [31:0] s,
                                       input logic signed [31:0] m);
    logic signed [32:0] rounded;
    logic signed [63:0] prod, scaled;
    logic signed [31:0] a, b, lo;
    logic [5:0] k;
    // One 32 x 32 -> 64-bit multiplier serves MUL, REQUANT and ADD_REQUANT (four DSP slices
    // per lane instead of eleven): MUL d * s, REQUANT d * s, ADD_REQUANT (d + s) * m.
    a = op == `HAPM_ALU_ADD_REQUANT ? d + s : d;
    b = op == `HAPM_ALU_ADD_REQUANT ? m : s;
    prod = 64'(a) * 64'(b);
    lane = {1'b0, d};
    case (op)
      `HAPM_ALU_ADD: lane[31:0] = d + s;
      `HAPM_ALU_MUL: lane[31:0] = prod[31:0];  // the low 32 bits of the exact product
      `HAPM_ALU_SHR: begin
        if (s < 0 || s > 31) lane[32] = 1'b1;
        else if (s != 0) begin
          k = s[5:0];
          rounded = (33'(d) + (33'sd1 <<< (k - 6'd1))) >>> k;  // round half up
          lane[31:0] = rounded[31:0];
        end
      end
      `HAPM_ALU_MIN: lane[31:0] = d < s ? d : s;
      `HAPM_ALU_MAX: lane[31:0] = d > s ? d : s;
      `HAPM_ALU_RELU: lane[31:0] = d > 0 ? d : 0;
      default: begin  // REQUANT: d * s; ADD_REQUANT: (d + s) * m, then ReLU if asked
        k = imm[5:0];
        lo = ACT_MIN;
        if (op == `HAPM_ALU_ADD_REQUANT && (imm & `HAPM_REQUANT_RELU) != 0 && lo < 0) lo = 0;
        // |prod| <= 2^62 and the rounding term <= 2^61: no overflow in 64 bits
        scaled = (prod + (64'sd1 <<< (k - 6'd1))) >>> k;
        lane[31:0] = scaled < 64'(lo) ? lo : scaled > 64'(ACT_MAX) ? ACT_MAX : scaled[31:0];
      end
    endcase
  endfunction

  // ---- loop nest (stage 0)
  logic        running;
  logic [2:0]  op_q;
  logic        use_imm_q;
  logic [15:0] imm_q;
  logic [31:0] d_cur, s_cur;  // the loop nest's destination and source of the current (o, i)
  logic        last_iter;
  hapm_nest nest (
      .clk(clk), .load(start), .step(running), .outer(i_outer), .inner(i_inner),
      .a_base(i_dst), .a_so(i_dst_so), .a_si(i_dst_si), .b_base(i_src), .b_so(i_src_so),
      .b_si(i_src_si), .a(d_cur), .b(s_cur), .last(last_iter));
  // the start cycle reads the multiplier; the loop's reads follow
  assign acc_raddr = {start ? AW'(i_src + 18'd1) : AW'(s_cur), AW'(d_cur)};
  logic          mfetch;  // the multiplier's read data is on the source port
  logic [VB-1:0] m_q;

  // ---- stage 1 (compute) and stage 2 (write) registers
  logic          v1, v2, pv;
  logic [AW-1:0] d1, s1, d2, pd;
  logic [VB-1:0] r2, pr;
  assign acc_we = v2;
  assign acc_waddr = d2;
  assign acc_wdata = r2;

  // The value of entry a as iteration j sees it: iteration j-1's result (being written now),
  // then iteration j-2's (written in the cycle j's read was made), then the read data.
  function automatic logic [VB-1:0] fwd(input logic [AW-1:0] a, input logic [VB-1:0] read);
    fwd = (v2 && d2 == a) ? r2 : (pv && pd == a) ? pr : read;
  endfunction

  logic [VB-1:0] dv, sv, mv, result;
  logic [C-1:0]  lane_err;
  always_comb begin
    dv = fwd(d1, acc_rdata[0 +: VB]);
    sv = fwd(s1, acc_rdata[VB +: VB]);
    mv = m_q;
    for (int c = 0; c < C; c++) begin
      logic [32:0] l;
      l = lane(op_q, imm_q, dv[c*32 +: 32],
               use_imm_q ? 32'(signed'(imm_q)) : sv[c*32 +: 32], mv[c*32 +: 32]);
      result[c*32 +: 32] = l[31:0];
      lane_err[c] = l[32];
    end
  end

  assign busy = running || v1 || v2;

  always_ff @(posedge clk) begin
    done <= 1'b0;
    if (rst) begin
      running <= 1'b0;
      v1 <= 1'b0;
      v2 <= 1'b0;
      pv <= 1'b0;
      error <= 1'b0;
    end else begin
      // stage 2 -> "previous write"; stage 1 -> stage 2
      pv <= v2;
      pd <= d2;
      pr <= r2;
      v2 <= v1;
      d2 <= d1;
      r2 <= result;
      if (v1 && op_q == `HAPM_ALU_SHR && !use_imm_q && |lane_err) error <= 1'b1;
      if (v2 && !v1 && !running) done <= 1'b1;
      // the multiplier, read in the start cycle
      mfetch <= start;
      if (mfetch) m_q <= acc_rdata[VB +: VB];
      // stage 0
      v1 <= running;
      d1 <= AW'(d_cur);
      s1 <= AW'(s_cur);
      if (start) begin
        running <= 1'b1;
        op_q <= i_op;
        use_imm_q <= i_use_imm;
        imm_q <= i_imm;
      end else if (running && last_iter) running <= 1'b0;
    end
  end
endmodule
