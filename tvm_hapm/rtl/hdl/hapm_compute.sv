// The compute module's controller (docs/isa.md; its timing rules are docs/timing.md's):
//   * GEMM: issued in one cycle to its array when the array is free (array k accumulates into
//     accumulator bank k only); the module goes on meanwhile.
//   * ALU and LOAD into acc: wait for the busy arrays whose bank holds an entry they write
//     (the bank's write port and first read port are the array's while it runs) and for the
//     in-flight GEMMs whose accumulator range overlaps an entry they only read (a scoreboard
//     of one range per array), then run to completion.
//   * FINISH: waits for every array.
//   * A token the compute module pushes is released only when every GEMM issued before it (and
//     by it) has completed: it waits in a small queue, so the module does not stall for it.
`include "hapm_config.svh"

module hapm_compute (
    input  logic                 clk,
    input  logic                 rst,
    input  logic                 head_valid,
    input  logic [`HAPM_INSN_BITS-1:0]         head,
    output logic                 head_pop,
    input  logic                 tok_prev_ready,   // load->compute holds a token
    input  logic                 tok_next_ready,   // store->compute holds a token
    output logic                 tok_pop_prev,
    output logic                 tok_pop_next,
    output logic                 tok_push_prev,    // compute->load
    output logic                 tok_push_next,    // compute->store
    output logic [`HAPM_A-1:0]   gemm_issue,
    input  logic [`HAPM_A-1:0]   gemm_busy,
    input  logic [`HAPM_A-1:0]   gemm_done,
    output logic                 alu_start,
    input  logic                 alu_done,
    output logic                 dma_start,
    input  logic                 dma_done,
    output logic                 finished,
    output logic                 idle,
    output logic                 error,
    output logic                 ended    // an ALU or accumulator LOAD, SYNC, FINISH ends
);
  localparam int A = `HAPM_A;

  // ---- fields of the head instruction
  logic [2:0]  op;
  logic        pop_prev, pop_next, push_prev, push_next;
  assign op = head[`HAPM_MEM_OPCODE_LO +: 3];
  assign pop_prev = head[`HAPM_MEM_POP_PREV_LO];
  assign pop_next = head[`HAPM_MEM_POP_NEXT_LO];
  assign push_prev = head[`HAPM_MEM_PUSH_PREV_LO];
  assign push_next = head[`HAPM_MEM_PUSH_NEXT_LO];

  // The last address of a loop nest: base + (outer - 1) * so + (inner - 1) * si, its products
  // at the fields' widths (10 x 14 and 10 x 6 bits: one DSP slice or a few LUTs each).
  function automatic logic [31:0] nest_last(input logic [17:0] base, input logic [9:0] outer,
                                            input logic [13:0] so, input logic [9:0] inner,
                                            input logic [5:0] si);
    logic [9:0]  o1, i1;
    logic [23:0] po;
    logic [15:0] pi;
    o1 = outer - 10'd1;
    i1 = inner - 10'd1;
    po = 24'(o1) * 24'(so);
    pi = 16'(i1) * 16'(si);
    nest_last = 32'(base) + 32'(po) + 32'(pi);
  endfunction

  // Accumulator ranges [lo, hi] the head touches (second range: an ALU's source operands).
  logic [31:0] lo1, hi1, lo2, hi2;
  logic        has2;
  logic [`HAPM_ARRAY_IDX_W-1:0] array;
  always_comb begin
    logic [12:0] rows, cols;  // a LOAD's padded region: at most 15 + 4095 + 15
    logic [1:0]  src_rows;
    logic [2:0]  alu_op;
    array = head[`HAPM_GEMM_ARRAY_LO +: `HAPM_ARRAY_IDX_W];
    lo1 = 0; hi1 = 0; lo2 = 0; hi2 = 0; has2 = 1'b0;
    rows = 0; cols = 0; src_rows = 0;  // every path assigns them: no latch
    alu_op = head[`HAPM_ALU_ALU_OP_LO +: 3];
    case (op)
      `HAPM_OP_GEMM: begin
        lo1 = 32'(head[`HAPM_GEMM_ACC_ADDR_LO +: `HAPM_GEMM_ACC_ADDR_W]);
        hi1 = nest_last(head[`HAPM_GEMM_ACC_ADDR_LO +: 18], head[`HAPM_GEMM_OUTER_LO +: 10],
                        head[`HAPM_GEMM_ACC_SO_LO +: 14], head[`HAPM_GEMM_INNER_LO +: 10],
                        head[`HAPM_GEMM_ACC_SI_LO +: 6]);
      end
      `HAPM_OP_ALU: begin
        lo1 = 32'(head[`HAPM_ALU_DST_ADDR_LO +: `HAPM_ALU_DST_ADDR_W]);
        hi1 = nest_last(head[`HAPM_ALU_DST_ADDR_LO +: 18], head[`HAPM_ALU_OUTER_LO +: 10],
                        head[`HAPM_ALU_DST_SO_LO +: 14], head[`HAPM_ALU_INNER_LO +: 10],
                        head[`HAPM_ALU_DST_SI_LO +: 6]);
        // source entries per iteration (isa.alu_operand_rows)
        src_rows = alu_op == `HAPM_ALU_ADD_REQUANT ? 2'd2 :
                   (alu_op == `HAPM_ALU_RELU || (head[`HAPM_ALU_USE_IMM_LO] &&
                    alu_op != `HAPM_ALU_REQUANT)) ? 2'd0 : 2'd1;
        has2 = src_rows != 0;
        lo2 = 32'(head[`HAPM_ALU_SRC_ADDR_LO +: `HAPM_ALU_SRC_ADDR_W]);
        hi2 = nest_last(head[`HAPM_ALU_SRC_ADDR_LO +: 18], head[`HAPM_ALU_OUTER_LO +: 10],
                        head[`HAPM_ALU_SRC_SO_LO +: 14], head[`HAPM_ALU_INNER_LO +: 10],
                        head[`HAPM_ALU_SRC_SI_LO +: 6]) + 32'(src_rows) - 1;
      end
      default: begin  // LOAD into acc: the padded region
        rows = 13'(head[`HAPM_MEM_Y_PAD_TOP_LO +: 4]) + 13'(head[`HAPM_MEM_Y_SIZE_LO +: 12])
               + 13'(head[`HAPM_MEM_Y_PAD_BOTTOM_LO +: 4]);
        cols = 13'(head[`HAPM_MEM_X_PAD_LEFT_LO +: 4]) + 13'(head[`HAPM_MEM_X_SIZE_LO +: 12])
               + 13'(head[`HAPM_MEM_X_PAD_RIGHT_LO +: 4]);
        lo1 = 32'(head[`HAPM_MEM_SRAM_ADDR_LO +: `HAPM_MEM_SRAM_ADDR_W]);
        hi1 = lo1 + 32'(26'(rows) * 26'(cols)) - 1;
      end
    endcase
  end

  // ---- the scoreboard: the bank of each busy array (its writes), and the accumulator range
  // of its GEMM in flight (the reads)
  logic [31:0] arr_lo [0:A-1];
  logic [31:0] arr_hi [0:A-1];
  logic        conflict;  // with a busy array
  always_comb begin
    conflict = 1'b0;
    for (int k = 0; k < A; k++)
      if (gemm_busy[k] && ((32'(k) * `HAPM_ACC_BANK_DEPTH <= hi1 &&
                            lo1 < 32'(k + 1) * `HAPM_ACC_BANK_DEPTH) ||
                           (has2 && arr_lo[k] <= hi2 && lo2 <= arr_hi[k])))
        conflict = 1'b1;
  end

  // ---- tokens waiting for GEMMs: {push_prev, push_next, GEMMs issued per array}
  logic [15:0] issued [0:A-1];
  logic [15:0] completed [0:A-1];
  localparam int PW = 2 + 16 * A;
  logic [PW-1:0] pend_in, pend_head;
  logic          pend_push, pend_pop, pend_empty, pend_full, head_released, all_done_now;
  hapm_fifo #(.W(PW), .AW($clog2(`HAPM_PEND_DEPTH))) pending (
      .clk(clk), .rst(rst), .push(pend_push), .din(pend_in), .pop(pend_pop),
      .head(pend_head), .empty(pend_empty), .full(pend_full));
  // counting the GEMMs that finish this cycle: a token is pushed in the cycle its GEMMs are done
  always_comb begin
    head_released = 1'b1;
    for (int k = 0; k < A; k++)
      if ($signed(completed[k] + 16'(gemm_done[k]) - pend_head[2 + 16*k +: 16]) < 0)
        head_released = 1'b0;
  end

  // ---- issue
  typedef enum logic [1:0] {READY, WAIT_ALU, WAIT_DMA} state_t;
  state_t state;
  logic ok, pushes, wait_push_prev, wait_push_next;
  assign pushes = push_prev || push_next;
  always_comb begin
    case (op)
      `HAPM_OP_GEMM: ok = !gemm_busy[array];
      `HAPM_OP_ALU: ok = !conflict;
      `HAPM_OP_LOAD: ok = !conflict;
      `HAPM_OP_FINISH: ok = gemm_busy == '0;
      default: ok = 1'b1;  // SYNC
    endcase
  end
  assign head_pop = state == READY && head_valid && ok && (!pop_prev || tok_prev_ready) &&
                    (!pop_next || tok_next_ready) && (!pushes || !pend_full);
  assign tok_pop_prev = head_pop && pop_prev;
  assign tok_pop_next = head_pop && pop_next;
  assign alu_start = head_pop && op == `HAPM_OP_ALU;
  assign dma_start = head_pop && op == `HAPM_OP_LOAD;
  always_comb begin
    gemm_issue = '0;
    if (head_pop && op == `HAPM_OP_GEMM) gemm_issue[array] = 1'b1;
  end

  // An instruction's tokens are ready to push when it ends: in its issue cycle (GEMM, SYNC,
  // FINISH) or when its ALU / DMA work is done.
  logic end_now, end_prev, end_next;
  assign end_now = (head_pop && op != `HAPM_OP_ALU && op != `HAPM_OP_LOAD && pushes) ||
                   (state == WAIT_ALU && alu_done && (wait_push_prev || wait_push_next)) ||
                   (state == WAIT_DMA && dma_done && (wait_push_prev || wait_push_next));
  assign end_prev = head_pop ? push_prev : wait_push_prev;
  assign end_next = head_pop ? push_next : wait_push_next;
  // The snapshot counts this instruction's own GEMM.
  always_comb begin
    pend_in[0] = end_prev;
    pend_in[1] = end_next;
    for (int k = 0; k < A; k++)
      pend_in[2 + 16*k +: 16] = issued[k] + 16'(gemm_issue[k]);
    // No GEMM in flight and none queued ahead: release at once.
    all_done_now = pend_empty && gemm_busy == '0 && gemm_issue == '0;
  end
  assign pend_push = end_now && !all_done_now;
  assign pend_pop = !pend_empty && head_released;
  assign tok_push_prev = (end_now && all_done_now && end_prev) || (pend_pop && pend_head[0]);
  assign tok_push_next = (end_now && all_done_now && end_next) || (pend_pop && pend_head[1]);

  assign idle = state == READY && pend_empty;
  // (a GEMM ends on its array: hapm_gemm's done)
  assign ended = (head_pop && op != `HAPM_OP_ALU && op != `HAPM_OP_LOAD && op != `HAPM_OP_GEMM) ||
                 (state == WAIT_ALU && alu_done) || (state == WAIT_DMA && dma_done);

  always_ff @(posedge clk) begin
    if (rst) begin
      state <= READY;
      finished <= 1'b0;
      error <= 1'b0;
      for (int k = 0; k < A; k++) begin
        issued[k] <= '0;
        completed[k] <= '0;
        arr_lo[k] <= '0;
        arr_hi[k] <= '0;
      end
    end else begin
      for (int k = 0; k < A; k++) begin
        if (gemm_issue[k]) begin
          issued[k] <= issued[k] + 16'd1;
          arr_lo[k] <= lo1;
          arr_hi[k] <= hi1;
        end
        if (gemm_done[k]) completed[k] <= completed[k] + 16'd1;
      end
      if (head_pop) begin
        if (op == `HAPM_OP_FINISH) finished <= 1'b1;
        if (op == `HAPM_OP_SYNC && head[`HAPM_SYNC_MODULE_LO +: 2] != `HAPM_MOD_COMPUTE)
          error <= 1'b1;
        wait_push_prev <= push_prev;
        wait_push_next <= push_next;
        if (op == `HAPM_OP_ALU) state <= WAIT_ALU;
        if (op == `HAPM_OP_LOAD) state <= WAIT_DMA;
      end
      if ((state == WAIT_ALU && alu_done) || (state == WAIT_DMA && dma_done)) state <= READY;
    end
  end
endmodule
