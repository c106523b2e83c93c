// hapm_top: the hapm_fpga accelerator (see ../README.md for the block diagram and interfaces).
//
// The host writes the DRAM slot base addresses (slot_base, byte addresses, slot k in bits
// [32k, 32k+32)) and the instruction count, pulses start, and waits for done.  Instructions are
// read from a synchronous instruction memory port; DRAM through one AXI-style memory port with a
// read channel (shared by the load module and the compute module's accumulator loads) and a
// write channel (the store module).
`include "hapm_config.svh"

module hapm_top (
    input  logic                       clk,
    input  logic                       rst,
    input  logic                       start,
    input  logic [31:0]                insn_count,
    input  logic [`HAPM_SLOTS*32-1:0]           slot_base,
    output logic                       done,
    output logic                       error,
    // instruction memory (data one cycle after the address)
    output logic [31:0]                imem_addr,
    input  logic [`HAPM_INSN_BITS-1:0]               imem_rdata,
    // DRAM read channel
    output logic                       ar_valid,
    input  logic                       ar_ready,
    output logic [31:0]                ar_addr,
    output logic [23:0]                ar_beats,
    input  logic                       r_valid,
    output logic                       r_ready,
    input  logic [`HAPM_BEAT_BITS-1:0] r_data,
    // DRAM write channel
    output logic                       aw_valid,
    input  logic                       aw_ready,
    output logic [31:0]                aw_addr,
    output logic [23:0]                aw_beats,
    output logic                       w_valid,
    input  logic                       w_ready,
    output logic [`HAPM_BEAT_BITS-1:0] w_data,
    input  logic                       b_valid,
    output logic                       b_ready,
    // event counters (for co-simulation and profiling)
    output logic [63:0]                cycles,
    output logic [63:0]                gemms_bypassed,
    // instruction trace: module m starts the instruction tr_start_idx[m] (its tokens popped),
    // and an instruction ends: tr_end bit m for module m (0 load, 1 compute, 2 store), bit 3+k
    // for a GEMM on array k
    output logic [2:0]                 tr_start,
    output logic [3*32-1:0]            tr_start_idx,
    output logic [3+`HAPM_A-1:0]       tr_end,
    output logic [(3+`HAPM_A)*32-1:0]  tr_end_idx
);
  localparam int A = `HAPM_A;
  localparam int IAW = `HAPM_INP_AW, WAW = `HAPM_WGT_AW, CAW = `HAPM_ACC_AW;
  localparam int IB = `HAPM_INP_BITS, WBB = `HAPM_WGT_BLOCK_BITS, VB = `HAPM_ACC_BITS;

  // ---- fetch and the module queues
  logic [2:0]   q_push, q_full, q_empty, q_pop;
  logic [`HAPM_INSN_BITS-1:0] fetched;
  logic [31:0]  fetched_idx;
  logic [`HAPM_INSN_BITS-1:0] q_head [0:2];
  logic [31:0]  q_idx [0:2];
  logic         fetch_idle;
  hapm_fetch fetch (
      .clk(clk), .rst(rst), .start(start), .count(insn_count), .imem_addr(imem_addr),
      .imem_rdata(imem_rdata), .full(q_full), .push(q_push), .insn(fetched),
      .index(fetched_idx), .idle(fetch_idle));
  for (genvar m = 0; m < 3; m++) begin : g_queue
    hapm_fifo #(.W(32 + `HAPM_INSN_BITS), .AW(`HAPM_FIFO_AW)) queue (  // {index, insn}
        .clk(clk), .rst(rst), .push(q_push[m]), .din({fetched_idx, fetched}), .pop(q_pop[m]),
        .head({q_idx[m], q_head[m]}), .empty(q_empty[m]), .full(q_full[m]));
  end

  // ---- dependency-token queues (counters; numbered as isa.TOKEN_QUEUES)
  logic [3:0]  tok_push, tok_pop;
  logic [15:0] tokens [0:3];
  always_ff @(posedge clk)
    for (int q = 0; q < 4; q++)
      if (rst || start) tokens[q] <= '0;
      else tokens[q] <= tokens[q] + 16'(tok_push[q]) - 16'(tok_pop[q]);

  // ---- load module
  logic ld_start, ld_done, ld_busy, ld_idle, ld_err, ld_ended, st_ended, cp_ended;
  logic ld_ar_valid, ld_ar_ready, ld_r_valid, ld_r_ready;
  logic [31:0] ld_ar_addr;
  logic [23:0] ld_ar_beats;
  logic ld_wr_en;
  logic [1:0] ld_wr_buf;
  logic [17:0] ld_wr_addr;
  logic [`HAPM_MAX_ENTRY_BYTES*8-1:0] ld_wr_raw;
  logic [VB-1:0] ld_wr_acc;
  hapm_access #(.MODULE(`HAPM_MOD_LOAD)) load_ctrl (
      .clk(clk), .rst(rst), .head_valid(!q_empty[0]), .head(q_head[0]), .head_pop(q_pop[0]),
      .token_ready(tokens[`HAPM_Q_COMPUTE_LOAD] != 0), .token_pop(tok_pop[`HAPM_Q_COMPUTE_LOAD]),
      .token_push(tok_push[`HAPM_Q_LOAD_COMPUTE]), .dma_start(ld_start), .dma_done(ld_done),
      .idle(ld_idle), .error(ld_err), .ended(ld_ended));
  hapm_dma_load load_dma (
      .clk(clk), .rst(rst), .start(ld_start), .insn(q_head[0]), .slot_base(slot_base),
      .busy(ld_busy), .done(ld_done), .ar_valid(ld_ar_valid), .ar_ready(ld_ar_ready),
      .ar_addr(ld_ar_addr), .ar_beats(ld_ar_beats), .r_valid(ld_r_valid), .r_ready(ld_r_ready),
      .r_data(r_data), .wr_en(ld_wr_en), .wr_buf(ld_wr_buf), .wr_addr(ld_wr_addr),
      .wr_raw(ld_wr_raw), .wr_acc(ld_wr_acc));

  // ---- store module
  logic st_start, st_done, st_busy, st_idle, st_err;
  logic [CAW-1:0] st_raddr;
  logic [VB-1:0]  st_rdata;
  hapm_access #(.MODULE(`HAPM_MOD_STORE)) store_ctrl (
      .clk(clk), .rst(rst), .head_valid(!q_empty[2]), .head(q_head[2]), .head_pop(q_pop[2]),
      .token_ready(tokens[`HAPM_Q_COMPUTE_STORE] != 0), .token_pop(tok_pop[`HAPM_Q_COMPUTE_STORE]),
      .token_push(tok_push[`HAPM_Q_STORE_COMPUTE]), .dma_start(st_start), .dma_done(st_done),
      .idle(st_idle), .error(st_err), .ended(st_ended));
  hapm_dma_store store_dma (
      .clk(clk), .rst(rst), .start(st_start), .insn(q_head[2]), .slot_base(slot_base),
      .busy(st_busy), .done(st_done), .aw_valid(aw_valid), .aw_ready(aw_ready),
      .aw_addr(aw_addr), .aw_beats(aw_beats), .w_valid(w_valid), .w_ready(w_ready),
      .w_data(w_data), .b_valid(b_valid), .b_ready(b_ready), .acc_raddr(st_raddr),
      .acc_rdata(st_rdata));

  // ---- compute module: controller, accumulator DMA, ALU, arrays
  logic cp_dma_start, cp_dma_done, cp_dma_busy, alu_start, alu_done, alu_busy, alu_err;
  logic finished, cp_idle, cp_err;
  logic [A-1:0] g_issue, g_busy, g_done, g_bypassed;
  logic cp_ar_valid, cp_ar_ready, cp_r_valid, cp_r_ready;
  logic [31:0] cp_ar_addr;
  logic [23:0] cp_ar_beats;
  logic cp_wr_en;
  logic [1:0] cp_wr_buf;
  logic [17:0] cp_wr_addr;
  logic [`HAPM_MAX_ENTRY_BYTES*8-1:0] cp_wr_raw;
  logic [VB-1:0] cp_wr_acc;
  hapm_compute compute_ctrl (
      .clk(clk), .rst(rst), .head_valid(!q_empty[1]), .head(q_head[1]), .head_pop(q_pop[1]),
      .tok_prev_ready(tokens[`HAPM_Q_LOAD_COMPUTE] != 0),
      .tok_next_ready(tokens[`HAPM_Q_STORE_COMPUTE] != 0),
      .tok_pop_prev(tok_pop[`HAPM_Q_LOAD_COMPUTE]), .tok_pop_next(tok_pop[`HAPM_Q_STORE_COMPUTE]),
      .tok_push_prev(tok_push[`HAPM_Q_COMPUTE_LOAD]),
      .tok_push_next(tok_push[`HAPM_Q_COMPUTE_STORE]),
      .gemm_issue(g_issue), .gemm_busy(g_busy), .gemm_done(g_done),
      .alu_start(alu_start), .alu_done(alu_done), .dma_start(cp_dma_start),
      .dma_done(cp_dma_done), .finished(finished), .idle(cp_idle), .error(cp_err),
      .ended(cp_ended));
  hapm_dma_load acc_dma (
      .clk(clk), .rst(rst), .start(cp_dma_start), .insn(q_head[1]), .slot_base(slot_base),
      .busy(cp_dma_busy), .done(cp_dma_done), .ar_valid(cp_ar_valid), .ar_ready(cp_ar_ready),
      .ar_addr(cp_ar_addr), .ar_beats(cp_ar_beats), .r_valid(cp_r_valid), .r_ready(cp_r_ready),
      .r_data(r_data), .wr_en(cp_wr_en), .wr_buf(cp_wr_buf), .wr_addr(cp_wr_addr),
      .wr_raw(cp_wr_raw), .wr_acc(cp_wr_acc));

  logic [2*CAW-1:0] alu_raddr;  // {source, destination}
  logic [2*VB-1:0]  alu_rdata;
  logic             alu_we;
  logic [CAW-1:0]   alu_waddr;
  logic [VB-1:0]    alu_wdata;
  hapm_alu alu (
      .clk(clk), .rst(rst), .start(alu_start),
      .i_op(q_head[1][`HAPM_ALU_ALU_OP_LO +: 3]), .i_use_imm(q_head[1][`HAPM_ALU_USE_IMM_LO]),
      .i_imm(q_head[1][`HAPM_ALU_IMM_LO +: 16]),
      .i_dst(q_head[1][`HAPM_ALU_DST_ADDR_LO +: 18]), .i_src(q_head[1][`HAPM_ALU_SRC_ADDR_LO +: 18]),
      .i_outer(q_head[1][`HAPM_ALU_OUTER_LO +: 10]), .i_inner(q_head[1][`HAPM_ALU_INNER_LO +: 10]),
      .i_dst_so(q_head[1][`HAPM_ALU_DST_SO_LO +: 14]), .i_dst_si(q_head[1][`HAPM_ALU_DST_SI_LO +: 6]),
      .i_src_so(q_head[1][`HAPM_ALU_SRC_SO_LO +: 14]), .i_src_si(q_head[1][`HAPM_ALU_SRC_SI_LO +: 6]),
      .busy(alu_busy), .done(alu_done), .error(alu_err), .acc_raddr(alu_raddr),
      .acc_rdata(alu_rdata), .acc_we(alu_we), .acc_waddr(alu_waddr), .acc_wdata(alu_wdata));

  logic [A*WAW-1:0] g_wgt_raddr;
  logic [A*WBB-1:0] g_wgt_rdata;
  logic [A*IAW-1:0] g_inp_raddr;
  logic [A*IB-1:0]  g_inp_rdata;
  logic [A*CAW-1:0] g_acc_raddr, g_acc_waddr;
  logic [A*VB-1:0]  g_acc_rdata, g_acc_wdata;
  logic [A-1:0]     g_acc_we;
  for (genvar k = 0; k < A; k++) begin : g_array
    hapm_gemm gemm (
        .clk(clk), .rst(rst), .issue(g_issue[k]),
        .i_reset(q_head[1][`HAPM_GEMM_RESET_LO]),
        .i_wgt_addr(q_head[1][`HAPM_GEMM_WGT_ADDR_LO +: 16]),
        .i_inp_addr(q_head[1][`HAPM_GEMM_INP_ADDR_LO +: 18]),
        .i_acc_addr(q_head[1][`HAPM_GEMM_ACC_ADDR_LO +: 18]),
        .i_outer(q_head[1][`HAPM_GEMM_OUTER_LO +: 10]), .i_inner(q_head[1][`HAPM_GEMM_INNER_LO +: 10]),
        .i_inp_so(q_head[1][`HAPM_GEMM_INP_SO_LO +: 14]), .i_inp_si(q_head[1][`HAPM_GEMM_INP_SI_LO +: 6]),
        .i_acc_so(q_head[1][`HAPM_GEMM_ACC_SO_LO +: 14]), .i_acc_si(q_head[1][`HAPM_GEMM_ACC_SI_LO +: 6]),
        .busy(g_busy[k]), .done(g_done[k]), .bypassed(g_bypassed[k]),
        .wgt_raddr(g_wgt_raddr[k*WAW +: WAW]), .wgt_rdata(g_wgt_rdata[k*WBB +: WBB]),
        .inp_raddr(g_inp_raddr[k*IAW +: IAW]), .inp_rdata(g_inp_rdata[k*IB +: IB]),
        .acc_raddr(g_acc_raddr[k*CAW +: CAW]), .acc_rdata(g_acc_rdata[k*VB +: VB]),
        .acc_we(g_acc_we[k]), .acc_waddr(g_acc_waddr[k*CAW +: CAW]),
        .acc_wdata(g_acc_wdata[k*VB +: VB]));
  end

  // ---- the buffers
  hapm_ram #(.W(IB), .D(`HAPM_INP_DEPTH), .AW(IAW), .NR(A), .NW(1)) inp_buf (
      .clk(clk), .we(ld_wr_en && ld_wr_buf == `HAPM_BUF_INP), .waddr(IAW'(ld_wr_addr)),
      .wdata(ld_wr_raw[IB-1:0]), .raddr(g_inp_raddr), .rdata(g_inp_rdata));
  // wgt has one read port: an array uses the block it reads only in the cycle after the compute
  // module issues its GEMM (hapm_gemm's CHECK), and at most one GEMM issues per cycle, so the
  // issuing array's address is the only one that matters.
  logic [WAW-1:0] wgt_raddr;
  logic [WBB-1:0] wgt_rdata;
  always_comb begin
    wgt_raddr = '0;
    for (int k = 0; k < A; k++)
      if (g_issue[k]) wgt_raddr = g_wgt_raddr[k*WAW +: WAW];
  end
  assign g_wgt_rdata = {A{wgt_rdata}};
  hapm_ram #(.W(WBB), .D(`HAPM_WGT_DEPTH), .AW(WAW), .NR(1), .NW(1)) wgt_buf (
      .clk(clk), .we(ld_wr_en && ld_wr_buf == `HAPM_BUF_WGT), .waddr(WAW'(ld_wr_addr)),
      .wdata(ld_wr_raw[WBB-1:0]), .raddr(wgt_raddr), .rdata(wgt_rdata));
  // acc: banked (hapm_acc_buf).  The ALU and the accumulator DMA never run together (one
  // compute instruction at a time); the scoreboard keeps them off the banks of busy arrays.
  logic [VB-1:0] cp_wdata;
  logic [CAW-1:0] cp_waddr;
  assign cp_wdata = alu_we ? alu_wdata : cp_wr_acc;
  assign cp_waddr = alu_we ? alu_waddr : CAW'(cp_wr_addr);
  hapm_acc_buf acc_buf (
      .clk(clk), .g_we(g_acc_we), .g_waddr(g_acc_waddr), .g_wdata(g_acc_wdata),
      .g_raddr(g_acc_raddr), .g_rdata(g_acc_rdata), .cp_we(alu_we || cp_wr_en),
      .cp_waddr(cp_waddr), .cp_wdata(cp_wdata), .alu_busy(alu_busy),
      .alu_dst_raddr(alu_raddr[0 +: CAW]), .alu_dst_rdata(alu_rdata[0 +: VB]),
      .alu_src_raddr(alu_raddr[CAW +: CAW]), .alu_src_rdata(alu_rdata[VB +: VB]),
      .st_raddr(st_raddr), .st_rdata(st_rdata));

  // ---- the read channel: requests in order, beats routed to the requester by a queue of ids
  logic        grant_cp;          // the compute module's request goes out this cycle
  logic        id_head, id_empty, id_full;
  logic [23:0] beats_left, remaining;  // beats of the head request still to come
  assign remaining = beats_left == 0 ? id_out[23:0] : beats_left;
  assign grant_cp = cp_ar_valid && !ld_ar_valid;
  assign ar_valid = (ld_ar_valid || cp_ar_valid) && !id_full;
  assign ar_addr = grant_cp ? cp_ar_addr : ld_ar_addr;
  assign ar_beats = grant_cp ? cp_ar_beats : ld_ar_beats;
  assign ld_ar_ready = ar_ready && !id_full && !grant_cp;
  assign cp_ar_ready = ar_ready && !id_full && grant_cp;
  logic [24:0] id_in, id_out;
  assign id_in = {grant_cp, ar_beats};
  hapm_fifo #(.W(25), .AW($clog2(`HAPM_MAX_READS))) read_ids (
      .clk(clk), .rst(rst), .push(ar_valid && ar_ready), .din(id_in),
      .pop(r_valid && r_ready && remaining == 24'd1), .head(id_out), .empty(id_empty),
      .full(id_full));
  assign id_head = id_out[24];
  assign ld_r_valid = r_valid && !id_empty && !id_head;
  assign cp_r_valid = r_valid && !id_empty && id_head;
  assign r_ready = !id_empty && (id_head ? cp_r_ready : ld_r_ready);
  always_ff @(posedge clk) begin
    if (rst || start) beats_left <= '0;
    else if (r_valid && r_ready) beats_left <= remaining - 24'd1;
  end

  // ---- the instruction trace
  logic [31:0] running_idx [0:2];
  logic [31:0] array_idx [0:A-1];
  always_ff @(posedge clk) begin
    for (int m = 0; m < 3; m++) if (q_pop[m]) running_idx[m] <= q_idx[m];
    for (int k = 0; k < A; k++) if (g_issue[k]) array_idx[k] <= q_idx[1];
  end
  assign tr_start = q_pop;
  assign tr_end = {g_done, st_ended, cp_ended, ld_ended};
  always_comb begin
    for (int m = 0; m < 3; m++) begin
      tr_start_idx[m*32 +: 32] = q_idx[m];
      // an instruction that ends in the cycle it starts (SYNC, FINISH) is the head
      tr_end_idx[m*32 +: 32] = q_pop[m] ? q_idx[m] : running_idx[m];
    end
    for (int k = 0; k < A; k++) tr_end_idx[(3+k)*32 +: 32] = array_idx[k];
  end

  // ---- completion
  logic running;
  assign done = !running;
  always_ff @(posedge clk) begin
    if (rst) begin
      running <= 1'b0;
      cycles <= '0;
      gemms_bypassed <= '0;
      error <= 1'b0;
    end else begin  // one program per reset: start clears only the cycle counter
      if (start) begin
        running <= 1'b1;
        cycles <= '0;
      end else if (running) begin
        // cycles: up to the first cycle in which everything is idle (the run's length)
        if (finished && fetch_idle && q_empty == 3'b111 && ld_idle && st_idle && cp_idle &&
            g_busy == '0 && !alu_busy)
          running <= 1'b0;
        else cycles <= cycles + 64'd1;
      end
      gemms_bypassed <= gemms_bypassed + 64'($countones(g_done & g_bypassed));
      if (ld_err || st_err || cp_err || alu_err) error <= 1'b1;
    end
  end
endmodule

// The accumulator buffer: A banks of ACC_BANK_DEPTH entries (docs/isa.md, "Accumulator
// banks"); array k accumulates into bank k only.  Each bank is three copies of a block RAM with
// one write and one read port, all written together:
//   * write port: array k, or the compute module (ALU or accumulator DMA) when array k is idle
//     (the compute controller's scoreboard waits for it);
//   * copy 0: array k's read-modify-write, or the ALU's destination when array k is idle;
//   * copy 1: the ALU's source operand (any bank; the multiplier of ADD_REQUANT is read
//     through it before the first iteration);
//   * copy 2: the store module.
// A module of its own so that synthesis can report it apart (tvm_hapm.rtl.synth).
module hapm_acc_buf (
    input  logic                       clk,
    // arrays: bank k is array k's
    input  logic [`HAPM_A-1:0]                 g_we,
    input  logic [`HAPM_A*`HAPM_ACC_AW-1:0]    g_waddr,
    input  logic [`HAPM_A*`HAPM_ACC_BITS-1:0]  g_wdata,
    input  logic [`HAPM_A*`HAPM_ACC_AW-1:0]    g_raddr,
    output logic [`HAPM_A*`HAPM_ACC_BITS-1:0]  g_rdata,
    // compute module: one write (ALU or accumulator DMA); the ALU's two reads
    input  logic                       cp_we,
    input  logic [`HAPM_ACC_AW-1:0]    cp_waddr,
    input  logic [`HAPM_ACC_BITS-1:0]  cp_wdata,
    input  logic                       alu_busy,
    input  logic [`HAPM_ACC_AW-1:0]    alu_dst_raddr,
    output logic [`HAPM_ACC_BITS-1:0]  alu_dst_rdata,
    input  logic [`HAPM_ACC_AW-1:0]    alu_src_raddr,
    output logic [`HAPM_ACC_BITS-1:0]  alu_src_rdata,
    // store module
    input  logic [`HAPM_ACC_AW-1:0]    st_raddr,
    output logic [`HAPM_ACC_BITS-1:0]  st_rdata
);
  localparam int A = `HAPM_A, AW = `HAPM_ACC_AW, BAW = `HAPM_ACC_BANK_AW, VB = `HAPM_ACC_BITS;
  localparam int BW = AW - BAW > 0 ? AW - BAW : 1;  // bank index bits

  function automatic logic [BW-1:0] bank(input logic [AW-1:0] a);
    bank = A == 1 ? '0 : BW'(a >> BAW);
  endfunction

  logic [BW-1:0] dst_bank_q, src_bank_q, st_bank_q;
  always_ff @(posedge clk) begin
    dst_bank_q <= bank(alu_dst_raddr);
    src_bank_q <= bank(alu_src_raddr);
    st_bank_q <= bank(st_raddr);
  end

  logic [VB-1:0] q0 [0:A-1];
  logic [VB-1:0] q1 [0:A-1];
  logic [VB-1:0] q2 [0:A-1];
  for (genvar b = 0; b < A; b++) begin : g_bank
    logic          cp_here, alu_here, we;
    logic [BAW-1:0] waddr, raddr0;
    logic [VB-1:0]  wdata;
    assign cp_here = cp_we && bank(cp_waddr) == BW'(b);
    assign alu_here = alu_busy && bank(alu_dst_raddr) == BW'(b);
    assign we = cp_here || g_we[b];
    assign waddr = BAW'(cp_here ? cp_waddr : g_waddr[b*AW +: AW]);
    assign wdata = cp_here ? cp_wdata : g_wdata[b*VB +: VB];
    assign raddr0 = BAW'(alu_here ? alu_dst_raddr : g_raddr[b*AW +: AW]);
    hapm_ram #(.W(VB), .D(`HAPM_ACC_BANK_DEPTH), .AW(BAW)) copy0 (
        .clk(clk), .we(we), .waddr(waddr), .wdata(wdata), .raddr(raddr0), .rdata(q0[b]));
    hapm_ram #(.W(VB), .D(`HAPM_ACC_BANK_DEPTH), .AW(BAW)) copy1 (
        .clk(clk), .we(we), .waddr(waddr), .wdata(wdata), .raddr(BAW'(alu_src_raddr)),
        .rdata(q1[b]));
    hapm_ram #(.W(VB), .D(`HAPM_ACC_BANK_DEPTH), .AW(BAW)) copy2 (
        .clk(clk), .we(we), .waddr(waddr), .wdata(wdata), .raddr(BAW'(st_raddr)),
        .rdata(q2[b]));
    assign g_rdata[b*VB +: VB] = q0[b];
  end
  assign alu_dst_rdata = q0[dst_bank_q];
  assign alu_src_rdata = q1[src_bank_q];
  assign st_rdata = q2[st_bank_q];
endmodule
