// One GEMM unit: a systolic array with its controller, running one GEMM instruction at a time
// (docs/isa.md, "GEMM"), concurrently with the other arrays and the compute module.
//
// Cycles of one GEMM after the issue cycle: 1 to read the weight block (and check it for the
// Dynamic Sparsity Bypass), R to shift it into the array, then one input vector per cycle over
// the outer x inner loop, and R + C cycles until the last vector's sum is written back.
//   bypassed (all-zero block):  reset = 0: DSB_CHECK_CYCLES cycles, nothing written;
//                               reset = 1: the accumulators are zeroed, one per cycle.
`include "hapm_config.svh"

module hapm_gemm (
    input  logic                       clk,
    input  logic                       rst,
    // issue (one cycle) from the compute module
    input  logic                       issue,
    input  logic                       i_reset,
    input  logic [15:0]                i_wgt_addr,
    input  logic [17:0]                i_inp_addr,
    input  logic [17:0]                i_acc_addr,
    input  logic [9:0]                 i_outer,
    input  logic [9:0]                 i_inner,
    input  logic [13:0]                i_inp_so,
    input  logic [5:0]                 i_inp_si,
    input  logic [13:0]                i_acc_so,
    input  logic [5:0]                 i_acc_si,
    output logic                       busy,
    output logic                       done,      // one cycle, when the last sum is written
    output logic                       bypassed,  // with done: the bypass skipped the block
    // buffer ports (registered reads: data one cycle after the address)
    output logic [`HAPM_WGT_AW-1:0]    wgt_raddr,
    input  logic [`HAPM_WGT_BLOCK_BITS-1:0] wgt_rdata,
    output logic [`HAPM_INP_AW-1:0]    inp_raddr,
    input  logic [`HAPM_INP_BITS-1:0]  inp_rdata,
    output logic [`HAPM_ACC_AW-1:0]    acc_raddr,
    input  logic [`HAPM_ACC_BITS-1:0]  acc_rdata,
    output logic                       acc_we,
    output logic [`HAPM_ACC_AW-1:0]    acc_waddr,
    output logic [`HAPM_ACC_BITS-1:0]  acc_wdata
);
  localparam int R = `HAPM_R, C = `HAPM_C, WB = `HAPM_WGT_BITS, AW = `HAPM_ACC_AW;
  localparam int LAT = R + C;  // vector presented -> its sum available

  typedef enum logic [2:0] {IDLE, CHECK, BYPASS, ZERO, PRELOAD, STREAM, DRAIN} state_t;
  state_t state;

  logic        reset_q;
  logic [15:0] wgt_addr_q;
  logic [31:0] inp_cur, acc_cur;  // the loop nest's addresses of the current (o, i)
  logic [`HAPM_WGT_BLOCK_BITS-1:0] block;
  logic [15:0] count;
  logic        last_iter;
  hapm_nest nest (
      .clk(clk), .load(state == IDLE && issue), .step(state == ZERO || state == STREAM),
      .outer(i_outer), .inner(i_inner), .a_base(i_inp_addr), .a_so(i_inp_so),
      .a_si(i_inp_si), .b_base(i_acc_addr), .b_so(i_acc_so), .b_si(i_acc_si), .a(inp_cur),
      .b(acc_cur), .last(last_iter));

  // ---- the array, fed one block row per cycle while preloading (last row first)
  logic [`HAPM_C*WB-1:0] w_row;
  logic [`HAPM_ACC_BITS-1:0] y_vec;
  assign w_row = block[(R-1-32'(count))*C*WB +: C*WB];
  hapm_systolic array (
      .clk(clk), .shift_w(state == PRELOAD), .w_row(w_row), .x_vec(inp_rdata), .y_vec(y_vec));

  // ---- the vector pipeline: (valid, reset, acc address) travel with each vector
  logic streaming;
  assign streaming = state == STREAM;
  logic [AW+1:0] tag_in, tag_rd, tag_wr;  // {valid, reset, address}
  assign tag_in = {streaming, reset_q, acc_cur[AW-1:0]};
  hapm_delay #(.W(AW+2), .N(LAT-1)) to_read (.clk(clk), .d(tag_in), .q(tag_rd));
  always_ff @(posedge clk) tag_wr <= rst ? '0 : tag_rd;

  // Accumulate: read acc one cycle before the sum appears; forward the previous cycle's write
  // when it hit the same entry (the read could not see it).
  logic                      last_we;
  logic [AW-1:0]             last_addr;
  logic [`HAPM_ACC_BITS-1:0] last_sum, base, sum;
  assign base = tag_wr[AW] ? '0 : (last_we && last_addr == tag_wr[AW-1:0]) ? last_sum : acc_rdata;
  always_comb
    for (int c = 0; c < C; c++) sum[c*32 +: 32] = base[c*32 +: 32] + y_vec[c*32 +: 32];

  always_comb begin
    wgt_raddr = issue ? i_wgt_addr[`HAPM_WGT_AW-1:0] : wgt_addr_q[`HAPM_WGT_AW-1:0];
    inp_raddr = inp_cur[`HAPM_INP_AW-1:0];
    acc_raddr = tag_rd[AW-1:0];
    if (state == ZERO) begin
      acc_we = 1'b1;
      acc_waddr = acc_cur[AW-1:0];
      acc_wdata = '0;
    end else begin
      acc_we = tag_wr[AW+1];
      acc_waddr = tag_wr[AW-1:0];
      acc_wdata = sum;
    end
  end

  assign busy = state != IDLE;

  always_ff @(posedge clk) begin
    done <= 1'b0;
    bypassed <= 1'b0;
    last_we <= acc_we && state != ZERO;
    last_addr <= acc_waddr;
    last_sum <= acc_wdata;
    if (rst) begin
      state <= IDLE;
      last_we <= 1'b0;
    end else begin
      case (state)
        IDLE: if (issue) begin
          reset_q <= i_reset;
          wgt_addr_q <= i_wgt_addr;
          state <= CHECK;
        end
        CHECK: begin  // the block arrives: the bypass looks at it
          block <= wgt_rdata;
          count <= '0;
          if (`HAPM_DSB_ENABLED && wgt_rdata == '0) begin
            if (reset_q) state <= ZERO;
            else if (`HAPM_DSB_CHECK_CYCLES <= 1) begin
              state <= IDLE;
              done <= 1'b1;
              bypassed <= 1'b1;
            end else state <= BYPASS;
          end else state <= PRELOAD;
        end
        BYPASS: begin
          count <= count + 16'd1;
          if (32'(count) + 2 >= `HAPM_DSB_CHECK_CYCLES) begin
            state <= IDLE;
            done <= 1'b1;
            bypassed <= 1'b1;
          end
        end
        ZERO: begin  // a bypassed reset GEMM still clears its accumulators
          if (last_iter) begin
            state <= IDLE;
            done <= 1'b1;
            bypassed <= 1'b1;
          end
        end
        PRELOAD: begin
          count <= count + 16'd1;
          if (32'(count) == R - 1) state <= STREAM;
        end
        STREAM: begin
          if (last_iter) begin
            count <= '0;
            state <= DRAIN;
          end
        end
        DRAIN: begin  // the last vector's sum is written in the LAT-th cycle after it
          count <= count + 16'd1;
          if (32'(count) == LAT - 1) begin
            state <= IDLE;
            done <= 1'b1;
          end
        end
        default: state <= IDLE;
      endcase
    end
  end
endmodule
