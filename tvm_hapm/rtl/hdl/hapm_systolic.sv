// One weight-stationary systolic array of R x C processing elements (docs/timing.md, "GEMM").
//
//   * Weights shift in from the top, one block row per cycle (shift_w): after R shifts, with the
//     block's rows fed last row first, PE (r, c) holds W[r][c].
//   * Input vector element x[r] enters row r from the left after r cycles of skew and moves one
//     PE to the right per cycle; partial sums move one PE down per cycle.
//   * Column c's dot product leaves the bottom row R + c + 1 cycles after the vector entered the
//     skew registers; the de-skew registers delay column c by C - 1 - c more cycles, so the whole
//     C-vector y = x @ W appears R + C cycles after x (y_vec is valid for x_vec's vector then).
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

module hapm_systolic (
    input  logic                           clk,
    input  logic                           shift_w,
    input  logic [`HAPM_C*`HAPM_WGT_BITS-1:0] w_row,  // the block row entering the top
    input  logic [`HAPM_INP_BITS-1:0]      x_vec,
    output logic [`HAPM_ACC_BITS-1:0]      y_vec
);
  localparam int R = `HAPM_R, C = `HAPM_C, AB = `HAPM_ACT_BITS, WB = `HAPM_WGT_BITS;
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
endmodule
