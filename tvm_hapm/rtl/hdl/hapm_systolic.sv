// One weight-stationary systolic array of R x C processing elements (docs/timing.md, "GEMM").
//
//   * Weights shift in from the top, one block row per cycle (shift_w): after R shifts, with the
//     block's rows fed last row first, PE (r, c) holds W[r][c].
//   * Input vector element x[r] enters row r from the left after r cycles of skew and moves one
//     PE to the right per cycle; partial sums move one PE down per cycle.
//   * Column c's dot product leaves the bottom row R + c + 1 cycles after the vector entered the
//     skew registers; the de-skew registers delay column c by C - 1 - c more cycles, so the whole
//     C-vector y = x @ W appears R + C cycles after x (y_vec is valid for x_vec's vector then).
//   * With 8-bit activations and weights and an even C, two neighbouring columns share one PE
//     (hapm_pe2, one DSP slice for both products): the pair's columns move together, x one pair
//     to the right per cycle, and the de-skew makes up for it, so y still appears R + C cycles
//     after x.
`include "hapm_config.svh"

module hapm_pe (
    input  logic                               clk,
    input  logic                               shift_w,
    input  logic signed [`HAPM_WGT_BITS-1:0]   w_in,
    output logic signed [`HAPM_WGT_BITS-1:0]   w,       // this PE's weight, fed to the PE below
    input  logic signed [`HAPM_ACT_BITS-1:0]   x_in,
    output logic signed [`HAPM_ACT_BITS-1:0]   x_out,
    input  logic [31:0]                        psum_in,
    output logic [31:0]                        psum_out
);
  // The exact product, sign-extended to the 32-bit partial sum; partial sums wrap modulo 2^32,
  // which gives the ISA's wrap32 of the exact dot product (addition mod 2^32 is associative).
  logic signed [`HAPM_ACT_BITS+`HAPM_WGT_BITS-1:0] prod;
  logic signed [31:0] prod32;
  assign prod = x_in * w;
  assign prod32 = 32'(prod);
  always_ff @(posedge clk) begin
    if (shift_w) w <= w_in;
    x_out <= x_in;
    psum_out <= psum_in + prod32;
  end
endmodule

// Two PEs of one row and two neighbouring columns (lo, hi) in one multiplier: x times the packed
// weight w_hi * 2^16 + w_lo (25 bits signed: a DSP48E1's A input, and a DSP48E2's) holds both
// products, x * w_lo in its low 16 bits (|x * w_lo| <= 2^14) and x * w_hi above them (less one
// when x * w_lo is negative).  The partial sums are added in the fabric, each PSW bits wide:
// a column's sum of R exact products, |sum| <= R * 2^14, never wraps, so it equals the 32-bit
// sum of hapm_pe.  8-bit activations and weights only.
module hapm_pe2 #(parameter int PSW = 20) (
    input  logic                   clk,
    input  logic                   shift_w,
    input  logic signed [7:0]      w_in_lo,
    input  logic signed [7:0]      w_in_hi,
    output logic signed [7:0]      w_lo,     // this pair's weights, fed to the pair below
    output logic signed [7:0]      w_hi,
    input  logic signed [7:0]      x_in,
    output logic signed [7:0]      x_out,
    input  logic signed [PSW-1:0]  psum_in_lo,
    input  logic signed [PSW-1:0]  psum_in_hi,
    output logic signed [PSW-1:0]  psum_out_lo,
    output logic signed [PSW-1:0]  psum_out_hi
);
  logic signed [24:0] packed_w;
  logic signed [32:0] prod;          // |prod| <= 2^7 * (2^23 + 2^7)
  logic signed [15:0] p_lo;
  logic signed [16:0] p_hi;
  assign packed_w = 25'(w_hi) * 25'sd65536 + 25'(w_lo);
  assign prod = 33'(x_in) * 33'(packed_w);
  assign p_lo = prod[15:0];
  assign p_hi = prod[32:16] + 17'(prod[15]);
  always_ff @(posedge clk) begin
    if (shift_w) begin
      w_lo <= w_in_lo;
      w_hi <= w_in_hi;
    end
    x_out <= x_in;
    psum_out_lo <= psum_in_lo + PSW'(p_lo);
    psum_out_hi <= psum_in_hi + PSW'(p_hi);
  end
endmodule

module hapm_systolic (
    input  logic                           clk,
    input  logic                           shift_w,
    input  logic [`HAPM_C*`HAPM_WGT_BITS-1:0] w_row,  // the block row entering the top
    input  logic [`HAPM_INP_BITS-1:0]      x_vec,
    output logic [`HAPM_ACC_BITS-1:0]      y_vec
);
  localparam int R = `HAPM_R, C = `HAPM_C, AB = `HAPM_ACT_BITS, WB = `HAPM_WGT_BITS;
  localparam bit PAIRS = AB == 8 && WB == 8 && C % 2 == 0;
  generate
    if (PAIRS) begin : g_pairs
      // P = C / 2 column pairs; pair j holds columns 2j (lo) and 2j + 1 (hi).  Partial sums of
      // PSW bits: R products of at most 2^14 in magnitude, and a sign bit.
      localparam int P = C / 2, PSW = 16 + $clog2(R) + 1;
      logic [R*(P+1)*AB-1:0] xbus;
      logic [(R+1)*C*PSW-1:0] pbus;   // column c of row r at ((r*C)+c)*PSW
      logic [(R+1)*C*WB-1:0] wbus;
      assign pbus[C*PSW-1:0] = '0;
      assign wbus[C*WB-1:0] = w_row;
      for (genvar r = 0; r < R; r++) begin : g_row
        hapm_delay #(.W(AB), .N(r)) skew (
            .clk(clk), .d(x_vec[r*AB +: AB]), .q(xbus[(r*(P+1))*AB +: AB]));
        for (genvar j = 0; j < P; j++) begin : g_pair
          hapm_pe2 #(.PSW(PSW)) pe (
              .clk(clk), .shift_w(shift_w),
              .w_in_lo(wbus[(r*C+2*j)*WB +: WB]), .w_in_hi(wbus[(r*C+2*j+1)*WB +: WB]),
              .w_lo(wbus[((r+1)*C+2*j)*WB +: WB]), .w_hi(wbus[((r+1)*C+2*j+1)*WB +: WB]),
              .x_in(xbus[(r*(P+1)+j)*AB +: AB]), .x_out(xbus[(r*(P+1)+j+1)*AB +: AB]),
              .psum_in_lo(pbus[(r*C+2*j)*PSW +: PSW]),
              .psum_in_hi(pbus[(r*C+2*j+1)*PSW +: PSW]),
              .psum_out_lo(pbus[((r+1)*C+2*j)*PSW +: PSW]),
              .psum_out_hi(pbus[((r+1)*C+2*j+1)*PSW +: PSW]));
        end
      end
      // Pair j's sums leave the bottom row R + j + 1 cycles after x entered: C - 1 - j more.
      for (genvar c = 0; c < C; c++) begin : g_deskew
        logic [PSW-1:0] y;
        hapm_delay #(.W(PSW), .N(C-1-c/2)) deskew (
            .clk(clk), .d(pbus[(R*C+c)*PSW +: PSW]), .q(y));
        assign y_vec[c*32 +: 32] = 32'(signed'(y));
      end
    end else begin : g_cols
      // Flat buses between the PEs: x moves right (R rows of C+1 taps), psums and weights move
      // down (R+1 rows of C taps).
      logic [R*(C+1)*AB-1:0] xbus;
      logic [(R+1)*C*32-1:0] pbus;
      logic [(R+1)*C*WB-1:0] wbus;
      assign pbus[C*32-1:0] = '0;
      assign wbus[C*WB-1:0] = w_row;
      for (genvar r = 0; r < R; r++) begin : g_row
        hapm_delay #(.W(AB), .N(r)) skew (
            .clk(clk), .d(x_vec[r*AB +: AB]), .q(xbus[(r*(C+1))*AB +: AB]));
        for (genvar c = 0; c < C; c++) begin : g_col
          hapm_pe pe (
              .clk(clk), .shift_w(shift_w),
              .w_in(wbus[(r*C+c)*WB +: WB]), .w(wbus[((r+1)*C+c)*WB +: WB]),
              .x_in(xbus[(r*(C+1)+c)*AB +: AB]), .x_out(xbus[(r*(C+1)+c+1)*AB +: AB]),
              .psum_in(pbus[(r*C+c)*32 +: 32]), .psum_out(pbus[((r+1)*C+c)*32 +: 32]));
        end
      end
      for (genvar c = 0; c < C; c++) begin : g_deskew
        hapm_delay #(.W(32), .N(C-1-c)) deskew (
            .clk(clk), .d(pbus[(R*C+c)*32 +: 32]), .q(y_vec[c*32 +: 32]));
      end
    end
  endgenerate
endmodule
